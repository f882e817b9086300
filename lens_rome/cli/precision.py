"""``lens-rome precision``: is bfloat16 fast here?"""

from __future__ import annotations

import argparse

from lens_rome.cli.arguments import command


def add_precision_parser(commands) -> None:
    """Add the ``precision`` command to an ``argparse`` subparsers object."""
    sub = commands.add_parser(
        "precision", help="is bfloat16 fast here? the probe's answer and each command's precision",
        description="Measure once whether bfloat16 matrix products beat float32 on this "
                    "machine, and print the precision each entry point then uses.")
    sub.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    sub.set_defaults(run=run_precision)


@command
def run_precision(args: argparse.Namespace) -> int:
    """Run ``lens-rome precision``; returns the exit status."""
    from lens_rome.model.precision import entry_points, probe_report  # noqa: PLC0415 (heavy import after parsing)

    probe = probe_report(args.device)
    print(f"device: {args.device} ({probe.get('cpu', probe.get('device'))}"
          + (f", torch CPU capability {probe['cpu_capability']}" if "cpu_capability" in probe
             else "") + ")")
    print(f"bfloat16 is {'fast' if probe['bf16_fast'] else 'slow'} here: {probe['rule']}")
    for name, precision in entry_points(args.device).items():
        print(f"  {precision:9} {name}")
    return 0
