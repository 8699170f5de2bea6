"""Drain this Ray node as a preemption when its cloud announces a spot reclaim.

    python ~/spot_notice.py --cloud aws &     # started by cluster/aws/cluster.yaml after `ray start`
    python ~/spot_notice.py --cloud gcp &     # cluster/gcp/cluster.yaml

Polls the instance metadata every ``--poll-s`` seconds. On a notice it runs, once, ``ray
drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N`` for this node,
N the seconds left before the reclaim, and exits: Ray Train's workers then get the notice and
checkpoint (``cluster.preemption_poll_s``; cluster/README.md, "Spot nodes"). ``ray drain-node``
does not stop the node: the cloud does, at the deadline.

- aws: ``spot/instance-action`` (IMDSv2), which appears about two minutes before a reclaim with
  its time;
- gcp: ``instance/preempted`` turning ``TRUE``, 30 seconds before the instance stops.

Standard library only: it runs beside ``ray start``, in the image's Python.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

METADATA = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal"}
GCP_NOTICE_S = 30  # GCP stops a preempted instance 30 s after setting instance/preempted


def aws_seconds_left(base: str, now: float) -> float | None:
    """Seconds to the reclaim in AWS's spot instance-action, or None while there is none."""
    put = urllib.request.Request(
        f"{base}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    )
    with urllib.request.urlopen(put, timeout=2) as r:
        token = r.read().decode()
    get = urllib.request.Request(
        f"{base}/latest/meta-data/spot/instance-action", headers={"X-aws-ec2-metadata-token": token}
    )
    try:
        with urllib.request.urlopen(get, timeout=2) as r:
            action = json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:  # no reclaim scheduled
            return None
        raise
    when = dt.datetime.strptime(action["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return when.timestamp() - now


def gcp_seconds_left(base: str, now: float, first_seen: list[float]) -> float | None:
    """Seconds to the stop once GCP's instance/preempted is TRUE (30 s from when it was first seen)."""
    get = urllib.request.Request(
        f"{base}/computeMetadata/v1/instance/preempted", headers={"Metadata-Flavor": "Google"}
    )
    with urllib.request.urlopen(get, timeout=2) as r:
        if r.read().decode().strip().upper() != "TRUE":
            return None
    first_seen.append(now)
    return GCP_NOTICE_S - (now - first_seen[0])


def drain(ray: str, cloud: str, seconds_left: float) -> int:
    cmd = [
        ray, "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message", f"{cloud} spot reclaim notice",
        "--deadline-remaining-seconds", str(max(1, int(seconds_left))),
    ]  # fmt: skip
    print(f"spot notice: {seconds_left:.0f} s left; {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, timeout=120).returncode


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cloud", choices=sorted(METADATA), required=True)
    p.add_argument("--metadata-url", help="the metadata server (default: the cloud's)")
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between polls (default 5)")
    p.add_argument("--ray", default="ray", help="the ray command (default: ray on PATH)")
    args = p.parse_args(argv)
    base, first_seen = args.metadata_url or METADATA[args.cloud], []
    while True:
        try:
            now = time.time()
            left = (
                aws_seconds_left(base, now)
                if args.cloud == "aws"
                else gcp_seconds_left(base, now, first_seen)
            )
        except (OSError, ValueError, KeyError) as e:  # metadata briefly unreachable: ask again
            print(f"spot notice: metadata not read ({e}); trying again", file=sys.stderr, flush=True)
            left = None
        if left is not None:
            return drain(args.ray, args.cloud, left)
        time.sleep(args.poll_s)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
