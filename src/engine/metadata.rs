//! Model metadata: label names, preprocessing and default thresholds.
//!
//! A model carries its own in ONNX `metadata_props` under `labelcast.*` keys
//! (written by `models/export.py`); a sidecar `<model>.toml` next to the file
//! overrides them, and the config's `[model]` section overrides both. So a
//! model exported by someone else still runs once its labels are given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ConfigError, InputLayout, MetadataOverrides, OutputKind, ResizeMode};

/// The `metadata_props` keys labelcast reads (documented in the README).
pub mod keys {
    pub const LABELS: &str = "labelcast.labels";
    pub const MEAN: &str = "labelcast.mean";
    pub const STD: &str = "labelcast.std";
    pub const OUTPUT: &str = "labelcast.output";
    pub const RESIZE: &str = "labelcast.resize";
    pub const THRESHOLDS: &str = "labelcast.thresholds";
    pub const INPUT_SIZE: &str = "labelcast.input_size";
    pub const MODEL_NAME: &str = "labelcast.model_name";
    pub const MODEL_VERSION: &str = "labelcast.model_version";
    pub const BACKBONE: &str = "labelcast.backbone";
    pub const RECIPE_HASH: &str = "labelcast.recipe_hash";
    pub const LAYOUT: &str = "labelcast.layout";
    pub const OUTPUT_NAME: &str = "labelcast.output_name";
}

/// ImageNet statistics, the most common choice, used when nothing says otherwise.
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, Clone, PartialEq)]
pub struct ModelMetadata {
    pub name: String,
    pub version: Option<String>,
    pub labels: Vec<String>,
    /// Where the labels came from: the model, a sidecar, or the config.
    pub labels_from: String,
    /// Per channel, on the 0..1 scale: the model sees `(x/255 - mean) / std`.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub output: OutputKind,
    pub resize: ResizeMode,
    /// Default on-thresholds per label, from the model or sidecar.
    pub thresholds: BTreeMap<String, f32>,
    /// `(height, width)` when the model says so; used if the graph's input is symbolic.
    pub input_size: Option<(usize, usize)>,
    pub backbone: Option<String>,
    pub recipe_hash: Option<String>,
    /// Where the input keeps its channels, when the model or config says so
    /// (otherwise read from the input's shape).
    pub layout: Option<InputLayout>,
    /// Which output holds the scores, when the model has several.
    pub output_name: Option<String>,
}

/// The sidecar file's keys: the same as the metadata keys without `labelcast.`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    labels: Option<Vec<String>>,
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
    output: Option<String>,
    resize: Option<String>,
    thresholds: Option<BTreeMap<String, f32>>,
    input_size: Option<String>,
    model_name: Option<String>,
    model_version: Option<String>,
    layout: Option<String>,
    output_name: Option<String>,
}

/// `model.onnx` -> `model.toml`.
pub fn sidecar_path(model: &Path) -> PathBuf {
    model.with_extension("toml")
}

impl ModelMetadata {
    /// Combines the model's `metadata_props`, an optional sidecar and the
    /// config's overrides, checking every value.
    pub fn resolve(
        model_path: &Path,
        props: &BTreeMap<String, String>,
        overrides: &MetadataOverrides,
        require_labels: bool,
    ) -> Result<ModelMetadata, ConfigError> {
        let in_model = |key: &str, msg: String| {
            ConfigError::new("model.path", format!("{}: metadata {key}: {msg}", model_path.display()))
        };
        let json = |key: &'static str| -> Result<Option<serde_json::Value>, ConfigError> {
            props
                .get(key)
                .map(|text| serde_json::from_str(text).map_err(|err| in_model(key, format!("not JSON ({err})"))))
                .transpose()
        };

        let mut labels: Option<(Vec<String>, String)> = match json(keys::LABELS)? {
            Some(value) => Some((
                serde_json::from_value(value)
                    .map_err(|_| in_model(keys::LABELS, "expected a JSON list of strings".into()))?,
                "model metadata".to_string(),
            )),
            None => None,
        };
        let triplet = |key: &'static str| -> Result<Option<[f32; 3]>, ConfigError> {
            json(key)?
                .map(|v| serde_json::from_value(v).map_err(|_| in_model(key, "expected a list of 3 numbers".into())))
                .transpose()
        };
        let mut mean = triplet(keys::MEAN)?;
        let mut std = triplet(keys::STD)?;
        let mut output =
            props.get(keys::OUTPUT).map(|s| OutputKind::parse(s).map_err(|m| in_model(keys::OUTPUT, m))).transpose()?;
        let mut resize =
            props.get(keys::RESIZE).map(|s| ResizeMode::parse(s).map_err(|m| in_model(keys::RESIZE, m))).transpose()?;
        let mut thresholds: BTreeMap<String, f32> = json(keys::THRESHOLDS)?
            .map(|v| {
                serde_json::from_value(v)
                    .map_err(|_| in_model(keys::THRESHOLDS, "expected a JSON object of label: number".into()))
            })
            .transpose()?
            .unwrap_or_default();
        let mut input_size = props
            .get(keys::INPUT_SIZE)
            .map(|s| parse_size(s).map_err(|m| in_model(keys::INPUT_SIZE, m)))
            .transpose()?;
        let mut layout = props
            .get(keys::LAYOUT)
            .map(|s| InputLayout::parse(s).map_err(|m| in_model(keys::LAYOUT, m)))
            .transpose()?;
        let mut output_name = props.get(keys::OUTPUT_NAME).cloned();
        let mut name = props.get(keys::MODEL_NAME).cloned();
        let mut version = props.get(keys::MODEL_VERSION).cloned();

        let sidecar_file = sidecar_path(model_path);
        if sidecar_file.is_file() {
            let field = format!("sidecar {}", sidecar_file.display());
            let text = std::fs::read_to_string(&sidecar_file)
                .map_err(|err| ConfigError::new(&field, format!("cannot read: {err}")))?;
            let sidecar: Sidecar =
                toml::from_str(&text).map_err(|err| ConfigError::new(&field, err.message().to_string()))?;
            if let Some(v) = sidecar.labels {
                labels = Some((v, format!("sidecar {}", sidecar_file.display())));
            }
            mean = sidecar.mean.or(mean);
            std = sidecar.std.or(std);
            if let Some(v) = sidecar.output {
                output = Some(OutputKind::parse(&v).map_err(|m| ConfigError::new(format!("{field}: output"), m))?);
            }
            if let Some(v) = sidecar.resize {
                resize = Some(ResizeMode::parse(&v).map_err(|m| ConfigError::new(format!("{field}: resize"), m))?);
            }
            if let Some(v) = sidecar.thresholds {
                thresholds.extend(v);
            }
            if let Some(v) = sidecar.input_size {
                input_size = Some(parse_size(&v).map_err(|m| ConfigError::new(format!("{field}: input_size"), m))?);
            }
            if let Some(v) = sidecar.layout {
                layout = Some(InputLayout::parse(&v).map_err(|m| ConfigError::new(format!("{field}: layout"), m))?);
            }
            output_name = sidecar.output_name.or(output_name);
            name = sidecar.model_name.or(name);
            version = sidecar.model_version.or(version);
        }

        if let Some(v) = &overrides.labels {
            labels = Some((v.clone(), "config model.labels".to_string()));
        }
        let (labels, labels_from) = match labels {
            Some(found) => found,
            None if !require_labels => (Vec::new(), "nowhere".to_string()),
            None => {
                return Err(ConfigError::new(
                    "model.labels",
                    format!(
                        "{} carries no label names (metadata key {}): set model.labels in the config or labels = [...] in {}",
                        model_path.display(),
                        keys::LABELS,
                        sidecar_file.display()
                    ),
                ));
            }
        };
        if labels.is_empty() && require_labels {
            return Err(ConfigError::new("model.labels", format!("the label list from {labels_from} is empty")));
        }
        // Names from the model or its sidecar become topics just as the
        // config's own do (checked again here, which costs nothing).
        let field = format!("model.labels (from {labels_from}; model {})", model_path.display());
        crate::config::check_label_names(&labels, &field)?;
        for (label, value) in &thresholds {
            if !(0.0..=1.0).contains(value) {
                return Err(in_model(keys::THRESHOLDS, format!("{label}: expected 0 to 1, got {value}")));
            }
        }
        let std = overrides.std.or(std).unwrap_or(IMAGENET_STD);
        if std.iter().any(|v| !v.is_finite() || *v <= 0.0) {
            return Err(in_model(keys::STD, format!("every value must be a number above 0, got {std:?}")));
        }
        let mean = overrides.mean.or(mean).unwrap_or(IMAGENET_MEAN);
        if mean.iter().any(|v| !v.is_finite()) {
            return Err(in_model(keys::MEAN, format!("every value must be a finite number, got {mean:?}")));
        }
        let name = name.unwrap_or_else(|| {
            model_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
        });
        Ok(ModelMetadata {
            name,
            version,
            labels,
            labels_from,
            mean,
            std,
            output: overrides.output.or(output).unwrap_or(OutputKind::Logits),
            // A model made for centre crops (or silent about it) expects
            // windows of its own aspect ratio; unless the config asks for
            // the centre alone, labelcast covers the whole frame with such
            // windows (`tiles`): on the held-out photos cut to 16:9, mAP
            // 0.644 against 0.590 for the centre crop and 0.522 letterboxed
            // (benches/fit_modes.py, README "Fitting a frame to the model").
            resize: overrides.resize.unwrap_or(match resize {
                None | Some(ResizeMode::CenterCrop) => ResizeMode::Tiles,
                Some(other) => other,
            }),
            thresholds,
            input_size,
            backbone: props.get(keys::BACKBONE).cloned(),
            recipe_hash: props.get(keys::RECIPE_HASH).cloned(),
            layout: overrides.layout.or(layout),
            output_name: overrides.output_name.clone().or(output_name),
        })
    }
}

/// `"224x224"` or `"224"` -> `(224, 224)`.
fn parse_size(text: &str) -> Result<(usize, usize), String> {
    let parse = |s: &str| s.trim().parse::<usize>().ok().filter(|v| (8..=8192).contains(v));
    let size = match text.split_once(['x', 'X']) {
        Some((h, w)) => parse(h).zip(parse(w)),
        None => parse(text).map(|v| (v, v)),
    };
    size.ok_or_else(|| format!("expected a size like \"224x224\", got {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn metadata_in_the_model_is_read() {
        let p = props(&[
            (keys::LABELS, r#"["cat","dog"]"#),
            (keys::MEAN, "[0.5,0.5,0.5]"),
            (keys::STD, "[0.25,0.25,0.25]"),
            (keys::OUTPUT, "probabilities"),
            (keys::THRESHOLDS, r#"{"cat":0.6}"#),
            (keys::INPUT_SIZE, "160x192"),
        ]);
        let m = ModelMetadata::resolve(Path::new("/nowhere/m.onnx"), &p, &MetadataOverrides::default(), true).unwrap();
        assert_eq!(m.labels, ["cat", "dog"]);
        assert_eq!(m.mean, [0.5; 3]);
        assert_eq!(m.output, OutputKind::Probabilities);
        assert_eq!(m.thresholds["cat"], 0.6);
        assert_eq!(m.input_size, Some((160, 192)));
        assert_eq!(m.name, "m");
    }

    #[test]
    fn a_sidecar_overrides_the_model_and_the_config_overrides_both() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("net.onnx");
        std::fs::write(dir.path().join("net.toml"), "labels = [\"a\", \"b\"]\nmean = [0.1, 0.2, 0.3]\n").unwrap();
        let p = props(&[(keys::LABELS, r#"["x","y"]"#), (keys::MEAN, "[0.9,0.9,0.9]")]);
        let m = ModelMetadata::resolve(&model, &p, &MetadataOverrides::default(), true).unwrap();
        assert_eq!(m.labels, ["a", "b"]);
        assert_eq!(m.mean, [0.1, 0.2, 0.3]);
        let overrides = MetadataOverrides { labels: Some(vec!["c".into(), "d".into()]), ..Default::default() };
        let m = ModelMetadata::resolve(&model, &p, &overrides, true).unwrap();
        assert_eq!(m.labels, ["c", "d"]);
        assert_eq!(m.labels_from, "config model.labels");
    }

    #[test]
    fn a_model_without_labels_asks_for_them_by_name() {
        let err = ModelMetadata::resolve(Path::new("/m/x.onnx"), &BTreeMap::new(), &MetadataOverrides::default(), true)
            .unwrap_err();
        assert_eq!(err.field, "model.labels");
        assert!(err.message.contains("/m/x.toml"), "{err}");
    }

    #[test]
    fn broken_metadata_names_the_key() {
        let p = props(&[(keys::LABELS, "cat,dog")]);
        let err = ModelMetadata::resolve(Path::new("/m/x.onnx"), &p, &MetadataOverrides::default(), true).unwrap_err();
        assert!(err.message.contains(keys::LABELS), "{err}");
    }

    #[test]
    fn without_preprocessing_metadata_imagenet_statistics_apply() {
        let p = props(&[(keys::LABELS, r#"["a"]"#)]);
        let m = ModelMetadata::resolve(Path::new("/m/x.onnx"), &p, &MetadataOverrides::default(), true).unwrap();
        assert_eq!((m.mean, m.std), (IMAGENET_MEAN, IMAGENET_STD));
        assert_eq!(m.output, OutputKind::Logits);
    }

    #[test]
    fn label_names_from_the_model_that_cannot_be_topics_are_refused_naming_their_source() {
        for bad in
            [r#"["cat","a/b"]"#, r#"["cat+"]"#, r##"["#"]"##, r#"["ok","nul\u0000"]"#, r#"["cat","cat"]"#, r#"[""]"#]
        {
            let p = props(&[(keys::LABELS, bad)]);
            let err =
                ModelMetadata::resolve(Path::new("/m/x.onnx"), &p, &MetadataOverrides::default(), true).unwrap_err();
            assert_eq!(err.field, "model.labels (from model metadata; model /m/x.onnx)", "{bad}: {err}");
        }
    }

    #[test]
    fn label_names_from_a_sidecar_are_checked_too() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("net.onnx");
        std::fs::write(dir.path().join("net.toml"), "labels = [\"person\", \"car/truck\"]\n").unwrap();
        let err = ModelMetadata::resolve(&model, &BTreeMap::new(), &MetadataOverrides::default(), true).unwrap_err();
        assert!(err.field.contains("sidecar") && err.message.contains("car/truck"), "{err}");
    }

    #[test]
    fn a_sidecar_std_or_mean_that_is_not_a_finite_number_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("net.onnx");
        let p = props(&[(keys::LABELS, r#"["a"]"#)]);
        for (text, key) in [("std = [nan, 1.0, 1.0]\n", keys::STD), ("mean = [0.5, inf, 0.5]\n", keys::MEAN)] {
            std::fs::write(dir.path().join("net.toml"), text).unwrap();
            let err = ModelMetadata::resolve(&model, &p, &MetadataOverrides::default(), true).unwrap_err();
            assert!(err.message.contains(key), "{text}: {err}");
        }
    }
}
