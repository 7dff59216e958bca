"""Writes the starting corpora for the fuzz targets (fuzz/corpus/<target>/seed-*).

The seeds are small, valid inputs the fuzzer mutates from: tiny ONNX image
classifiers (FP32 and QDQ INT8, with labelcast's metadata keys), small camera
frames in each pixel format (JPEG baseline, progressive, greyscale, and an
MJPEG frame without Huffman tables as UVC webcams send them), and config
files. Everything is generated here from numbers, no downloaded data; the
committed corpora are these seeds plus what fuzzing runs kept (minimised).

    .venv/bin/python fuzz/make_seeds.py
"""

import io
import json
import pathlib
import shutil

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
CORPUS = HERE / "corpus"


def write(target: str, name: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"seed-{name}").write_bytes(data)


def tiny_classifier(quantised: bool) -> bytes:
    """Conv 3->4 (3x3) -> Relu -> GlobalAveragePool -> Flatten -> Gemm 4->3 on a
    1x3x8x8 image; with `quantised`, weights and activations go through
    QuantizeLinear/DequantizeLinear pairs like the demo INT8 model."""
    rng = np.random.default_rng(7)
    conv_w = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    gemm_w = rng.normal(0, 0.5, (3, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "conv_b"),
             numpy_helper.from_array(np.zeros(3, np.float32), "gemm_b")]
    nodes = []
    if quantised:
        scale = np.float32(0.02)
        inits += [numpy_helper.from_array(np.array(scale), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
                  numpy_helper.from_array(np.clip(np.round(conv_w / scale), -127, 127).astype(np.int8), "conv_wq"),
                  numpy_helper.from_array(np.clip(np.round(gemm_w / scale), -127, 127).astype(np.int8), "gemm_wq")]
        nodes += [helper.make_node("DequantizeLinear", ["conv_wq", "s", "z"], ["conv_w"]),
                  helper.make_node("DequantizeLinear", ["gemm_wq", "s", "z"], ["gemm_w"]),
                  helper.make_node("QuantizeLinear", ["image", "s", "z"], ["image_q"]),
                  helper.make_node("DequantizeLinear", ["image_q", "s", "z"], ["image_dq"])]
        conv_in = "image_dq"
    else:
        inits += [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(gemm_w, "gemm_w")]
        conv_in = "image"
    nodes += [helper.make_node("Conv", [conv_in, "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "gemm_w", "gemm_b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in {"labelcast.labels": json.dumps(["cat", "dog", "bird"]),
                       "labelcast.mean": "[0.5, 0.5, 0.5]", "labelcast.std": "[0.25, 0.25, 0.25]",
                       "labelcast.thresholds": json.dumps({"cat": 0.6})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model.SerializeToString()


def picture(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x ^ y) & 255], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **options)
    return out.getvalue()


def without_huffman_tables(data: bytes) -> bytes:
    """Drops every DHT segment, as many UVC webcams send MJPEG frames."""
    out, i = bytearray(data[:2]), 2
    while i + 4 <= len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:  # start of scan: the rest is entropy-coded data
            out += data[i:]
            break
        if marker != 0xC4:
            out += data[i:i + 2 + length]
        i += 2 + length
    return bytes(out)


def frame_header(fmt: int, width: int, height: int, stride_pad: int = 0, choice: int = 0) -> bytes:
    """The frame_decode target's 5-byte header (see its doc comment)."""
    return bytes([fmt, width - 1, height - 1, stride_pad, choice])


def yuv_planes(image: Image.Image):
    ycbcr = np.asarray(image.convert("YCbCr")).astype(np.uint8)
    return ycbcr[..., 0], ycbcr[..., 1], ycbcr[..., 2]


def main() -> None:
    if CORPUS.exists():
        for folder in CORPUS.iterdir():
            for seed in folder.glob("seed-*"):
                seed.unlink()

    write("model_file", "tiny-fp32.onnx", tiny_classifier(quantised=False))
    write("model_file", "tiny-qdq-int8.onnx", tiny_classifier(quantised=True))

    mjpg, yuyv, nv12, grey, rgb = range(5)
    small = picture(16, 12)
    write("frame_decode", "jpeg-baseline", frame_header(mjpg, 1, 1) + jpeg(small, quality=90))
    write("frame_decode", "jpeg-progressive", frame_header(mjpg, 1, 1, choice=1) + jpeg(small, progressive=True))
    write("frame_decode", "jpeg-grey", frame_header(mjpg, 1, 1, choice=2) + jpeg(small.convert("L")))
    write("frame_decode", "jpeg-420", frame_header(mjpg, 1, 1, choice=4) + jpeg(picture(20, 14), subsampling=2))
    write("frame_decode", "mjpeg-no-huffman-tables",
          frame_header(mjpg, 1, 1, choice=3) + without_huffman_tables(jpeg(small, quality=75)))
    y, u, v = yuv_planes(small)
    packed = np.empty((12, 16 * 2), np.uint8)
    packed[:, 0::4], packed[:, 1::4], packed[:, 2::4], packed[:, 3::4] = y[:, 0::2], u[:, 0::2], y[:, 1::2], v[:, 0::2]
    write("frame_decode", "yuyv-16x12", frame_header(yuyv, 16, 12) + packed.tobytes())
    uv = np.empty((6, 16), np.uint8)
    uv[:, 0::2], uv[:, 1::2] = u[0::2, 0::2], v[0::2, 0::2]
    write("frame_decode", "nv12-16x12", frame_header(nv12, 16, 12, choice=1) + y.tobytes() + uv.tobytes())
    write("frame_decode", "grey-16x12-stride18",
          frame_header(grey, 16, 12, stride_pad=2, choice=5) + np.pad(y, ((0, 0), (0, 2))).tobytes())
    write("frame_decode", "rgb-16x12", frame_header(rgb, 16, 12, choice=2) + np.asarray(small).tobytes())

    repo = HERE.parent
    write("config", "example.toml", (repo / "systemd" / "config.example.toml").read_bytes())
    write("config", "minimal.toml", b'[source]\nuri = "test://pattern?format=yuyv"\n[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n')
    write("config", "labels.toml",
          b'device_id = "cam1"\n[labels]\nthreshold = 0.5\nhysteresis = 0.05\n'
          b'[labels.overrides.cat]\non = 0.7\noff = 0.6\n[output]\nmode = "stdout"\n')


if __name__ == "__main__":
    main()
