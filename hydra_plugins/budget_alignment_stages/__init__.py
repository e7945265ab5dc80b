"""Registers the project's OmegaConf resolver (`stage_instances`, src/budget_alignment/stages.py) in DVC's Hydra
composition: `dvc exp run` scans this folder (DVC's `hydra.plugins_path`, the repository root by default) for Hydra
plugins, importing each module, before it composes params.yaml from conf/."""

from budget_alignment.stages import register_resolver

register_resolver()
