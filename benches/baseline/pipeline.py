"""The Python pipeline a competent user would write instead of labelcast.

Same job, same model file, same frames, same broker, same payload: read a
JPEG, decode it with Pillow, centre-crop and resize it (bilinear), normalise
with numpy, run ONNX Runtime (CPU), sigmoid, per-label thresholds, publish
the labels JSON (and retained ON/OFF on change) with paho-mqtt. It is the
baseline `benches/e2e.sh` measures labelcast against; it is not part of
labelcast and never runs on a device.

    python benches/baseline/pipeline.py --model M --frames DIR --mqtt 127.0.0.1:1883 --threads 1
"""

import argparse
import io
import json
import os
import resource
import time

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
from PIL import Image


def metadata(session):
    meta = session.get_modelmeta().custom_metadata_map
    labels = json.loads(meta["labelcast.labels"])
    mean = np.array(json.loads(meta.get("labelcast.mean", "[0.485, 0.456, 0.406]")), dtype=np.float32)
    std = np.array(json.loads(meta.get("labelcast.std", "[0.229, 0.224, 0.225]")), dtype=np.float32)
    thresholds = json.loads(meta.get("labelcast.thresholds", "{}"))
    return labels, mean, std, [float(thresholds.get(label, 0.5)) for label in labels]


def centre_crop_resize(image, size):
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--frames", required=True, help="folder of JPEG frames, processed once in name order")
    parser.add_argument("--mqtt", default="127.0.0.1:1883")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefix", default="baseline/bench")
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    size = session.get_inputs()[0].shape[2] if isinstance(session.get_inputs()[0].shape[2], int) else 224
    labels, mean, std, thresholds = metadata(session)

    host, port = args.mqtt.rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"baseline-{os.getpid()}")
    client.will_set(f"{args.prefix}/available", "offline", qos=1, retain=True)
    client.connect(host, int(port), keepalive=30)
    client.loop_start()
    client.publish(f"{args.prefix}/available", "online", qos=1, retain=True)

    frames = sorted(os.path.join(args.frames, f) for f in os.listdir(args.frames) if f.lower().endswith(".jpg"))
    states = [False] * len(labels)
    stages = {"read": [], "decode": [], "preprocess": [], "infer": [], "publish": [], "frame": []}
    for sequence, path in enumerate(frames):
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            data = f.read()
        t1 = time.perf_counter()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        t2 = time.perf_counter()
        pixels = np.asarray(centre_crop_resize(image, size), dtype=np.float32) / 255.0
        tensor = ((pixels - mean) / std).transpose(2, 0, 1)[np.newaxis].astype(np.float32)
        t3 = time.perf_counter()
        logits = session.run(None, {input_name: tensor})[0][0]
        t4 = time.perf_counter()
        scores = 1.0 / (1.0 + np.exp(-logits))
        active = []
        payload_labels = {}
        for i, (label, score, threshold) in enumerate(zip(labels, scores, thresholds)):
            on = bool(score >= threshold)
            payload_labels[label] = {"score": round(float(score), 4), "state": "ON" if on else "OFF"}
            if on:
                active.append(label)
            if on != states[i]:
                states[i] = on
                client.publish(f"{args.prefix}/label/{label}", "ON" if on else "OFF", qos=1, retain=True)
        payload = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "sequence": sequence,
            "model": "labelcast-demo",
            "inference_ms": round((t4 - t3) * 1e3, 2),
            "frame_ms": round((t4 - t0) * 1e3, 2),
            "active": active,
            "labels": payload_labels,
            "origin": path,
        }
        client.publish(f"{args.prefix}/labels", json.dumps(payload), qos=1)
        t5 = time.perf_counter()
        for name, value in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
            stages[name].append(value * 1e3)
    client.publish(f"{args.prefix}/available", "offline", qos=1, retain=True).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()
    summary = {name: round(float(np.mean(values)), 3) for name, values in stages.items()}
    summary["frames"] = len(frames)
    summary["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
