"""Config helpers: OmegaConf resolvers, the conf/ location, and composing configs outside ``@hydra.main``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

if not OmegaConf.has_resolver("repo_root"):
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
if not OmegaConf.has_resolver("coalesce"):
    # first argument that is set: ${coalesce:${resume},<default>}
    OmegaConf.register_new_resolver(
        "coalesce", lambda *args: next((a for a in args if a not in (None, "", "null", "None")), None))
if not OmegaConf.has_resolver("if_set"):
    # ${if_set:${resume},A,B}: A when the first value is set, else B
    OmegaConf.register_new_resolver("if_set", lambda v, a, b: a if v not in (None, "", "null", "None") else b)


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, without running an app (tests, notebooks).

    ``paths.output_dir`` must then be given as an override, since no Hydra run directory exists.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])
