"""The seeds' "90-95% cheaper in a domain" claim, measured: a general run (tiny, trained on the embedded default, or
--run), two students pruned from it (half and a quarter of its size) and distilled on one domain's text (default:
the standard library's email package), and each int8; each on the domain's held-out text and on the general held-out text, with its cost per token served
(decode time at batch 16, as a share of the general run's) and the quality it gives up.

    python scripts/bench_domain.py [--run RUN] [--domain GLOB] [--steps 200] [--out FILE]

Prints one JSON line (minigpt/apps/compress_bench.py does the work)."""

import argparse
import sysconfig
import tempfile
from pathlib import Path

from minigpt.apps.compress_bench import STUDENTS, cost_summary, domain_rows, emit, train_run

DOMAIN = str(Path(sysconfig.get_paths()["stdlib"]) / "email" / "**" / "*.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="the general run (default: train tiny on the embedded default)")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--domain", default=DOMAIN, help="a glob of the domain's files (default: the stdlib's email package)")
    ap.add_argument("--steps", type=int, default=200, help="distillation steps on the domain")
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = Path(args.run) if args.run else train_run(root / "teacher", args.teacher_steps, {})
        rows = domain_rows(root, teacher, args.domain, args.steps, {})
    emit({"bench": "domain", "domain": args.domain, "students": STUDENTS, "distill_steps": args.steps, "rows": rows,
          "cost": cost_summary(rows),
          "convention": "measured here: bits per byte by minigpt eval on each held-out split (the domain's validation "
                        "files, the general run's); cost per token = decode time per token at batch 16 relative to the "
                        "general run (a price per hour cancels); predicted: extrapolate --serve's rooflines, compute-bound "
                        "(decode FLOPs per token at a full context, analytic/flops.decode_flops) and bandwidth-bound "
                        "(weight bytes read per decode step), each relative to the general run"}, args.out)

if __name__ == "__main__":
    main()
