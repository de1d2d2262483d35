"""Worker entry point, started by torchrun on every rank: `python -m trainer RUN_DIR/config.json`."""

from __future__ import annotations

from trainer import heap

heap.pause_collection()  # before the imports below: trainer/heap.py says why

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from trainer.config import load_worker_config
from trainer.distributed import die_with_parent, init_distributed, setup_logging
from trainer.fast_exit import exit_without_teardown
from trainer.nonfinite import EXIT_NONFINITE_LOSS, NonFiniteLoss
from trainer.preemption import EXIT_PREEMPTED, Preempted


@record  # an exception's traceback goes to torchrun's error file: the run's `last_error` (run_health.py)
def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m trainer RUN_DIR/config.json", file=sys.stderr)
        return 2
    die_with_parent()
    cfg = load_worker_config(argv[0])
    setup_logging(cfg.run.run_dir)
    init_distributed()
    from trainer.train import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.train()
    except Preempted:
        trainer.close("KILLED")
        return EXIT_PREEMPTED
    except NonFiniteLoss as err:  # a policy decision, not a crash: the message, no traceback
        logging.getLogger("trainer").error("%s", err)
        trainer.close("FAILED")
        return EXIT_NONFINITE_LOSS
    except KeyboardInterrupt:
        trainer.close("KILLED")
        raise
    except BaseException:
        logging.getLogger("trainer").exception("training failed")  # into logs/rank_<R>.log too
        trainer.close("FAILED")
        raise
    trainer.close("FINISHED")
    return 0


if __name__ == "__main__":
    # An exception still takes the normal way out (traceback, torchrun's error file).
    exit_without_teardown(main(sys.argv[1:]))
