"""``nemo-minitron <stage> [CONFIG.yaml] [key=value ...]``: argument parsing and error mapping only (the stages
themselves are in :mod:`nemo_minitron.stages`; nothing in the package imports this module).

Each stage validates its strict config first (a problem is one line on stderr and exit status 2), then
runs. Stages that need several ranks (TP x PP > 1) start them on this machine unless launched by
torchrun / Slurm, which set ``RANK`` and ``WORLD_SIZE``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from nemo_minitron.config import load_config
from nemo_minitron.errors import StoppedEarly, UserError, storage_error
from nemo_minitron.stages import STAGES, print_result, quiet_libraries, run_stage


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_libraries()
    stages = STAGES
    parser = argparse.ArgumentParser(
        prog="nemo-minitron",
        description="Minitron pruning and distillation on megatron-core.",
        epilog="stages:\n" + "\n".join(f"  {n:<14}{s.help}" for n, s in stages.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=sorted(stages), metavar="STAGE")
    parser.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    parser.add_argument("--quick", action="store_true", help="bench only: the config's quick_budgets")
    ns = parser.parse_intermixed_args(argv)
    if ns.quick and ns.stage != "bench":
        print(f"nemo-minitron {ns.stage}: error: --quick is an option of the bench stage", file=sys.stderr)
        return 2
    config_path = None
    overrides = list(ns.args) + (["quick=true"] if ns.quick else [])
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    try:
        if stages[ns.stage].parser is not None:
            # `launch slurm JOB.yaml ...`, `plan JOB.yaml ...`: another stage's config and overrides, and more.
            cfg = stages[ns.stage].parse(ns.args)
        else:
            cfg = load_config(stages[ns.stage].config_class(), config_path, overrides)
        result = run_stage(ns.stage, cfg)
    except StoppedEarly as exc:
        print(f"nemo-minitron {ns.stage}: {exc}", file=sys.stderr)
        print_result({"stopped_early": True})
        return 0
    except UserError as exc:
        print(f"nemo-minitron {ns.stage}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A full disk or an unwritable file system met while writing outside the stages' own checks.
        if (error := storage_error(exc)) is None:
            raise
        print(f"nemo-minitron {ns.stage}: error: {error}", file=sys.stderr)
        return 2
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
