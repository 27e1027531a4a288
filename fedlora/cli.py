"""`fedlora-sim`: the Hydra entry point (configs in conf/, named sweeps in experiments/)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fedlora.config import register_schema, resolve
from fedlora.errors import FedloraError, RunInterrupted

register_schema()

# Run directories of the jobs of a multirun that failed: the sweep goes on, and exits non-zero at the end.
_failed: list[str] = []


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    from fedlora.records import setup_logging

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    try:
        cfg = resolve(cfg)
        if cfg.resume is not None:  # the run's own config, in the run's own directory
            from fedlora.checkpoint import resumed_config

            cfg, _ = resumed_config(cfg.resume, list(hydra_cfg.overrides.task))
            run_dir = cfg.resume
        setup_logging(cfg.verbose)
        if cfg.data.get("on_nodes"):
            from fedlora.errors import ConfigError

            raise ConfigError("data.on_nodes=true is for deployments whose nodes bring their own local-data "
                              "(flwr run, docs/deploy.md); a simulation's virtual clients share the data set")
        # The data, the partitions and the model are checked before Ray starts, so that a mistake in
        # them stops here; the ServerApp, in this same process, reuses what they read.
        from fedlora.preflight import preflight

        preflight(cfg)
        from fedlora.simulation import run_simulation

        run_simulation(cfg, run_dir)
    except (RunInterrupted, KeyboardInterrupt):
        from fedlora.checkpoint import has_checkpoint

        resumable = f" (go on with: fedlora-sim resume={run_dir})" if has_checkpoint(run_dir) else ""
        print(f"fedlora-sim: interrupted; the rounds completed so far are in {run_dir}{resumable}", file=sys.stderr)
        sys.exit(130)
    except FedloraError as e:
        print(f"fedlora-sim: error: {e}", file=sys.stderr)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(2)
        _failed.append(run_dir)


def main() -> None:
    _main()
    if _failed:
        print(f"fedlora-sim: {len(_failed)} run(s) of the sweep failed (see summary.json in each): "
              + ", ".join(_failed), file=sys.stderr)
        sys.exit(1)
