"""Listens on a `labels` topic for the e2e bench and reports, as JSON, when
the first and last messages arrived (wall clock) and each message's
frame_ms. Exits after --count messages or --timeout seconds."""

import argparse
import json
import sys
import time

import paho.mqtt.client as mqtt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mqtt", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--ready-file", required=True, help="touched once subscribed")
    args = parser.parse_args()
    arrivals, frame_ms = [], []

    def on_message(_client, _userdata, message):
        arrivals.append(time.time())
        frame_ms.append(json.loads(message.payload)["frame_ms"])

    def on_subscribe(*_):
        open(args.ready_file, "w").close()

    host, port = args.mqtt.rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_connect = lambda c, *_: c.subscribe(args.topic, qos=1)
    client.connect(host, int(port))
    client.loop_start()
    deadline = time.time() + args.timeout
    while len(arrivals) < args.count and time.time() < deadline:
        time.sleep(0.01)
    client.loop_stop()
    json.dump({"first": arrivals[0] if arrivals else None, "last": arrivals[-1] if arrivals else None,
               "count": len(arrivals), "frame_ms": frame_ms}, sys.stdout)


if __name__ == "__main__":
    main()
