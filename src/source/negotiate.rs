//! Choosing a camera mode: what the user asked for (`width`, `height`,
//! `fps`, `format` in the source URI) against what the device offers.
//!
//! Pure functions over a mirror of the V4L2 enumeration ([`Offer`]), so the
//! choice is tested against recorded lists from real cameras without one
//! attached. The rules, in order: a requested pixel format the camera offers
//! wins; then the size nearest the one asked for (640x480 when none is: the
//! model input is far smaller, and smaller frames cost less to move and
//! convert); then a frame rate that reaches the one asked for (30 when none
//! is); then the format that is cheapest to convert (YUYV, NV12, GREY, then
//! MJPEG, which needs a JPEG decode). Whatever differs from the request is
//! said in [`Choice::compromises`], for the log.

use super::PixelFormat;

/// What the source URI asked for; `None` leaves the choice to labelcast.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub fps: Option<f64>,
    pub format: Option<PixelFormat>,
}

/// One pixel format a device offers, with its sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    pub fourcc: [u8; 4],
    /// The driver's description ("Motion-JPEG").
    pub description: String,
    pub sizes: Vec<SizeOffer>,
}

/// Frame sizes for one pixel format, as V4L2 enumerates them.
#[derive(Debug, Clone, PartialEq)]
pub enum SizeOffer {
    /// One size and its frame rates (empty when the driver does not list them).
    Discrete { width: u32, height: u32, fps: Vec<f64> },
    /// Any size in a range (Raspberry Pi and other ISP-backed drivers).
    Stepwise { min: (u32, u32), max: (u32, u32), step: (u32, u32) },
}

/// The mode to ask the driver for.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub fourcc: [u8; 4],
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    /// `None` when the driver lists no frame rates for the size.
    pub fps: Option<f64>,
    /// How the choice differs from the request, one sentence each.
    pub compromises: Vec<String>,
}

/// The pixel format a V4L2 fourcc carries, if labelcast can convert it.
pub fn pixel_format(fourcc: [u8; 4]) -> Option<PixelFormat> {
    Some(match &fourcc {
        b"MJPG" | b"JPEG" => PixelFormat::Mjpeg,
        b"YUYV" => PixelFormat::Yuyv,
        b"NV12" => PixelFormat::Nv12,
        b"GREY" => PixelFormat::Gray8,
        b"RGB3" => PixelFormat::Rgb8,
        _ => return None,
    })
}

/// Printable fourcc ("MJPG"); non-ASCII bytes as '?'.
pub fn fourcc_str(fourcc: [u8; 4]) -> String {
    fourcc.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '?' }).collect()
}

const DEFAULT_SIZE: (u32, u32) = (640, 480);
const DEFAULT_FPS: f64 = 30.0;

fn conversion_cost(format: PixelFormat) -> u32 {
    match format {
        PixelFormat::Yuyv => 0,
        PixelFormat::Nv12 => 1,
        PixelFormat::Gray8 => 2,
        PixelFormat::Mjpeg => 3,
        PixelFormat::Rgb8 => 4,
    }
}

/// How far a candidate is from the request, compared in order: format
/// asked for but not this one, size distance, fps shortfall, fps excess,
/// conversion cost. Smaller is better.
type Rank = (u32, u64, u64, u64, u32);

/// Picks a mode, or says why none will do (no format labelcast can convert).
pub fn choose(offers: &[Offer], request: &Request) -> Result<Choice, String> {
    let usable: Vec<(&Offer, PixelFormat)> =
        offers.iter().filter_map(|offer| pixel_format(offer.fourcc).map(|format| (offer, format))).collect();
    if usable.is_empty() {
        let offered: Vec<String> = offers.iter().map(|o| fourcc_str(o.fourcc)).collect();
        return Err(format!(
            "the camera offers {} and labelcast converts MJPG, YUYV, NV12, GREY and RGB3",
            if offered.is_empty() { "no pixel formats".to_string() } else { offered.join(", ") }
        ));
    }
    let (want_w, want_h) = match (request.width, request.height) {
        (Some(w), Some(h)) => (w, h),
        // One side given: keep the default aspect ratio.
        (Some(w), None) => (w, w * DEFAULT_SIZE.1 / DEFAULT_SIZE.0),
        (None, Some(h)) => (h * DEFAULT_SIZE.0 / DEFAULT_SIZE.1, h),
        (None, None) => DEFAULT_SIZE,
    };
    let want_fps = request.fps.unwrap_or(DEFAULT_FPS);
    let format_offered = request.format.is_some_and(|f| usable.iter().any(|(_, format)| *format == f));

    let mut best: Option<(Rank, Choice)> = None;
    for (offer, format) in &usable {
        let format_miss = u32::from(format_offered && request.format != Some(*format));
        for size in &offer.sizes {
            let (width, height, rates) = match size {
                SizeOffer::Discrete { width, height, fps } => (*width, *height, fps.clone()),
                SizeOffer::Stepwise { min, max, step } => {
                    (snap(want_w, min.0, max.0, step.0), snap(want_h, min.1, max.1, step.1), Vec::new())
                }
            };
            if width == 0 || height == 0 {
                continue;
            }
            let size_miss = u64::from(width.abs_diff(want_w)) + u64::from(height.abs_diff(want_h));
            // The rate that reaches the wanted one most closely from above, else the fastest.
            let fps = rates
                .iter()
                .copied()
                .filter(|r| *r >= want_fps - 0.01)
                .min_by(|a, b| a.total_cmp(b))
                .or_else(|| rates.iter().copied().max_by(|a, b| a.total_cmp(b)));
            let shortfall = fps.map_or(0, |r| ((want_fps - r).max(0.0) * 1000.0) as u64);
            let excess = fps.map_or(0, |r| ((r - want_fps).max(0.0) * 1000.0) as u64);
            let key = (format_miss, size_miss, shortfall, excess, conversion_cost(*format));
            if best.as_ref().is_none_or(|(best_key, _)| key < *best_key) {
                let choice =
                    Choice { fourcc: offer.fourcc, format: *format, width, height, fps, compromises: Vec::new() };
                best = Some((key, choice));
            }
        }
    }
    let (_, mut choice) = best.ok_or_else(|| "the camera lists no frame sizes".to_string())?;
    if let Some(wanted) = request.format.filter(|f| *f != choice.format) {
        choice.compromises.push(format!(
            "format {} is not offered; using {}",
            wanted.as_str(),
            fourcc_str(choice.fourcc)
        ));
    }
    if (request.width.is_some() || request.height.is_some()) && (choice.width, choice.height) != (want_w, want_h) {
        choice.compromises.push(format!(
            "{want_w}x{want_h} is not offered in {}; using the nearest, {}x{}",
            fourcc_str(choice.fourcc),
            choice.width,
            choice.height
        ));
    }
    if let (Some(wanted), Some(got)) = (request.fps, choice.fps)
        && (wanted - got).abs() > 0.01
    {
        choice
            .compromises
            .push(format!("{wanted} fps is not offered at {}x{}; using {got} fps", choice.width, choice.height));
    }
    Ok(choice)
}

/// The allowed value nearest `want` in `min..=max` by `step`.
fn snap(want: u32, min: u32, max: u32, step: u32) -> u32 {
    let clamped = want.clamp(min, max.max(min));
    if step <= 1 {
        return clamped;
    }
    let steps = ((clamped - min) as f64 / step as f64).round() as u32;
    (min + steps * step).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discrete(width: u32, height: u32, fps: &[f64]) -> SizeOffer {
        SizeOffer::Discrete { width, height, fps: fps.to_vec() }
    }

    /// What a Logitech C920 enumerates (`v4l2-ctl --list-formats-ext`,
    /// trimmed): YUYV is slow at large sizes over USB 2, MJPEG is not.
    fn c920() -> Vec<Offer> {
        vec![
            Offer {
                fourcc: *b"YUYV",
                description: "YUYV 4:2:2".into(),
                sizes: vec![
                    discrete(640, 480, &[30.0, 24.0, 15.0, 10.0, 5.0]),
                    discrete(160, 90, &[30.0, 24.0, 15.0]),
                    discrete(1280, 720, &[10.0, 5.0]),
                    discrete(1920, 1080, &[5.0]),
                ],
            },
            Offer { fourcc: *b"H264", description: "H.264".into(), sizes: vec![discrete(1920, 1080, &[30.0])] },
            Offer {
                fourcc: *b"MJPG",
                description: "Motion-JPEG".into(),
                sizes: vec![
                    discrete(640, 480, &[30.0, 24.0, 15.0]),
                    discrete(1280, 720, &[30.0, 24.0, 15.0]),
                    discrete(1920, 1080, &[30.0, 24.0, 15.0]),
                ],
            },
        ]
    }

    /// A Raspberry Pi camera through bcm2835-v4l2: any size in steps.
    fn pi_camera() -> Vec<Offer> {
        let stepwise = SizeOffer::Stepwise { min: (32, 32), max: (2592, 1944), step: (2, 2) };
        vec![
            Offer { fourcc: *b"YU12", description: "Planar YUV 4:2:0".into(), sizes: vec![stepwise.clone()] },
            Offer { fourcc: *b"NV12", description: "Y/CbCr 4:2:0".into(), sizes: vec![stepwise.clone()] },
            Offer { fourcc: *b"MJPG", description: "Motion-JPEG".into(), sizes: vec![stepwise] },
        ]
    }

    #[test]
    fn with_nothing_asked_a_webcam_gives_640x480_yuyv_at_30_fps() {
        let choice = choose(&c920(), &Request::default()).unwrap();
        assert_eq!((choice.format, choice.width, choice.height, choice.fps), (PixelFormat::Yuyv, 640, 480, Some(30.0)));
        assert!(choice.compromises.is_empty());
    }

    #[test]
    fn hd_at_30_fps_takes_mjpeg_because_yuyv_only_reaches_10() {
        let request = Request { width: Some(1280), height: Some(720), fps: Some(30.0), format: None };
        let choice = choose(&c920(), &request).unwrap();
        assert_eq!((choice.format, choice.width, choice.fps), (PixelFormat::Mjpeg, 1280, Some(30.0)));
    }

    #[test]
    fn an_asked_format_wins_over_frame_rate_and_the_shortfall_is_reported() {
        let request =
            Request { width: Some(1280), height: Some(720), fps: Some(30.0), format: Some(PixelFormat::Yuyv) };
        let choice = choose(&c920(), &request).unwrap();
        assert_eq!((choice.format, choice.width, choice.fps), (PixelFormat::Yuyv, 1280, Some(10.0)));
        assert_eq!(choice.compromises, vec!["30 fps is not offered at 1280x720; using 10 fps".to_string()]);
    }

    #[test]
    fn a_format_the_camera_lacks_falls_back_and_says_so() {
        let request = Request { format: Some(PixelFormat::Nv12), ..Request::default() };
        let choice = choose(&c920(), &request).unwrap();
        assert_eq!(choice.format, PixelFormat::Yuyv);
        assert_eq!(choice.compromises, vec!["format nv12 is not offered; using YUYV".to_string()]);
    }

    #[test]
    fn an_odd_size_gets_the_nearest_offered_one() {
        let request = Request { width: Some(1024), height: Some(600), fps: None, format: Some(PixelFormat::Mjpeg) };
        let choice = choose(&c920(), &request).unwrap();
        assert_eq!((choice.width, choice.height), (1280, 720));
        assert!(choice.compromises[0].contains("nearest, 1280x720"), "{:?}", choice.compromises);
    }

    #[test]
    fn a_stepwise_camera_gets_the_exact_size_snapped_to_its_step() {
        let request = Request { width: Some(801), height: Some(601), ..Request::default() };
        let choice = choose(&pi_camera(), &request).unwrap();
        // YU12 is skipped (not converted); NV12 is cheaper than MJPEG.
        assert_eq!((choice.fourcc, choice.width, choice.height, choice.fps), (*b"NV12", 802, 602, None));
        let huge = Request { width: Some(8000), height: Some(6000), ..Request::default() };
        let choice = choose(&pi_camera(), &huge).unwrap();
        assert_eq!((choice.width, choice.height), (2592, 1944));
    }

    #[test]
    fn an_infrared_camera_with_only_grey_is_used_as_it_is() {
        let offers = vec![Offer {
            fourcc: *b"GREY",
            description: "8-bit Greyscale".into(),
            sizes: vec![discrete(640, 400, &[60.0, 30.0])],
        }];
        let choice = choose(&offers, &Request::default()).unwrap();
        assert_eq!(
            (choice.format, choice.width, choice.height, choice.fps),
            (PixelFormat::Gray8, 640, 400, Some(30.0))
        );
    }

    #[test]
    fn a_camera_with_only_h264_is_refused_naming_what_it_offers() {
        let offers = vec![Offer { fourcc: *b"H264", description: "H.264".into(), sizes: vec![] }];
        let err = choose(&offers, &Request::default()).unwrap_err();
        assert!(err.contains("offers H264") && err.contains("MJPG, YUYV"), "{err}");
        assert!(choose(&[], &Request::default()).unwrap_err().contains("no pixel formats"));
    }
}
