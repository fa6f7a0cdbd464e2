"""The one config resolver: what a command line names, turned into a validated Config.

  model_config    a preset, a TOML file, a run directory (its config.json) or a Hugging Face config.json
                  (or its folder): the [model] the analytic commands measure
  target_config   a preset with a [target] table, a TOML file, or an HF config.json: what extrapolate costs
  train_config    `minigpt train`'s: a preset or file with --set overrides, or a resumed run's own saved
                  config pinned to its [model]; with train.init_from, [model] and the tokenizer of the weights
"""

from __future__ import annotations

from pathlib import Path

from minigpt.core.config import (
    Config,
    ModelConfig,
    apply_override,
    config_from_dict,
    config_from_json,
    configs_dir,
    load_config,
    load_raw,
    resolve_preset,
)
from minigpt.core.errors import UserError
from minigpt.core.hf_config import hf_stop_token, is_hf_config, model_from_hf, read_json


def model_config(name: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset name, a TOML file, a run directory or its config.json, or an HF config.json (or the
    folder holding it): the Config whose [model] the analytic commands measure."""
    path = Path(name) if name else None
    if path is not None and path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: give a preset, a TOML file, a run directory or an HF folder")
        path = path / "config.json"
    if path is None or path.suffix != ".json":
        return load_config(resolve_preset(name), overrides)
    raw = read_json(path, "config")
    if not is_hf_config(raw):
        if overrides:
            raise UserError(f"--set does not apply to a run's saved config {path}; use a TOML preset to change it")
        return config_from_json(path)
    if overrides:
        raise UserError(f"--set does not apply to a Hugging Face config.json ({path}); edit a copy of the file")
    return Config(model=model_from_hf(raw, str(path)))


def init_source(path: str, key: str = "train.init_from") -> tuple[str, ModelConfig, Path, str | None]:
    """What train.init_from (or `key`) names: ("run" | "hf", its [model], its tokenizer.json, its stop token)."""
    src = Path(path)
    if not (src / "config.json").is_file():
        raise UserError(f"{key} = {path!r} is neither a minigpt run directory nor a Hugging Face folder "
                        f"(no config.json there)")
    raw = read_json(src / "config.json", "config")
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{key} = {path!r} has no tokenizer.json; the weights need their tokenizer")
    if is_hf_config(raw):
        return "hf", model_from_hf(raw, str(src / "config.json"), for_weights=True), src / "tokenizer.json", None
    if not (src / "latest.json").is_file():
        raise UserError(f"{key} = {path!r} has no checkpoint (latest.json); train it first")
    saved = config_from_json(src / "config.json")
    if saved.model.quantization:
        raise UserError(f"{key} = {path!r} holds {saved.model.quantization}-quantized weights, for inference only: use "
                        f"the run it was made from (its quantized.json names it)")
    return "run", saved.model, src / "tokenizer.json", saved.sample.stop_token


def with_init_from(cfg: Config, explicit_model: dict) -> Config:
    """cfg with [model] and the tokenizer of train.init_from. A [model] key the config sets (its
    file's table or --set) must agree with the weights, except dropout, which a fine-tune may set."""
    kind, model, tokenizer, stop = init_source(cfg.train.init_from)
    if kind == "hf" and cfg.train.lora_rank:
        raise UserError(f"train.lora_rank > 0 keeps its base as a minigpt run (read again with the adapters): convert "
                        f"the HF folder first, minigpt convert --from-hf {cfg.train.init_from} --out RUN, and set "
                        f"train.init_from = RUN")
    for key in explicit_model:
        if key != "dropout" and getattr(cfg.model, key) != getattr(model, key):
            raise UserError(f"model.{key} = {getattr(cfg.model, key)!r} disagrees with the weights in "
                            f"train.init_from = {cfg.train.init_from!r} ({getattr(model, key)!r}); drop model.{key} "
                            f"from the config: the weights set the model's shape")
    if "dropout" in explicit_model:
        model.dropout = cfg.model.dropout
    if cfg.data.tokenizer not in ("bpe", str(tokenizer)):
        raise UserError(f"data.tokenizer = {cfg.data.tokenizer!r}, but train.init_from = {cfg.train.init_from!r} "
                        f"comes with its own tokenizer.json; drop data.tokenizer")
    cfg.model, cfg.data.tokenizer = model, str(tokenizer)
    if stop is not None or kind == "hf":
        cfg.sample.stop_token = stop or hf_stop_token(Path(cfg.train.init_from))[0]
    cfg.validate()
    return cfg


def with_distill_from(cfg: Config, explicit_model: dict) -> Config:
    """cfg with the teacher's tokenizer and vocabulary (the student's logits are matched to the teacher's token
    by token); the rest of [model] is the student's own."""
    _, teacher, tokenizer, stop = init_source(cfg.train.distill_from, "train.distill_from")
    if "vocab_size" in explicit_model and cfg.model.vocab_size != teacher.vocab_size:
        raise UserError(f"model.vocab_size = {cfg.model.vocab_size} differs from the teacher's {teacher.vocab_size} "
                        f"(train.distill_from): drop model.vocab_size, the student takes the teacher's tokenizer")
    if cfg.data.tokenizer not in ("bpe", str(tokenizer)):
        raise UserError(f"data.tokenizer = {cfg.data.tokenizer!r}, but the student of train.distill_from uses the "
                        f"teacher's tokenizer.json; drop data.tokenizer")
    cfg.model.vocab_size, cfg.data.tokenizer = teacher.vocab_size, str(tokenizer)
    if stop is not None:
        cfg.sample.stop_token = stop
    cfg.validate()
    return cfg


def target_config(name: str) -> Config:
    """A target for extrapolate: a preset or TOML with [target], an HF config.json (or its folder), a run."""
    path = Path(name)
    if path.suffix == ".json" or path.is_dir():
        return model_config(name)
    if not path.is_file():
        path = configs_dir() / f"{name}.toml"
    if not path.is_file():
        targets = sorted(p.stem for p in configs_dir().glob("*.toml") if "[target]" in p.read_text())
        raise UserError(f"unknown target {name!r}: give a TOML path or one of {', '.join(targets)}")
    return load_config(path)


def train_config(config: str | None, overrides: list[str], resume: str | None = None) -> Config:
    """`minigpt train`'s config: run_config, then train.init_from's [model] and tokenizer for a new run
    (a [model] key the file or --set gives explicitly must agree with the weights)."""
    cfg = run_config(config, overrides, resume)
    if (cfg.train.init_from or cfg.train.distill_from) and not resume:  # the default preset's [model] does not count
        explicit = load_raw(resolve_preset(config) if config else None, overrides).get("model", {})
        cfg = with_init_from(cfg, explicit) if cfg.train.init_from else with_distill_from(cfg, explicit)
    return cfg


def run_config(config: str | None, overrides: list[str], resume: str | None = None) -> Config:
    """The config of `minigpt train`: a preset or file with --set overrides, or, with `resume`, the
    run's own saved config (plus overrides) pinned to its [model]."""
    if not resume:
        return load_config(resolve_preset(config), overrides)
    run_dir = Path(resume)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; give a directory written by 'minigpt train'")
    if not (run_dir / "latest.json").is_file():
        raise UserError(f"{run_dir} has no checkpoint (latest.json missing); train first or give another run directory")
    saved = config_from_json(run_dir / "config.json")
    if config:
        requested = load_config(resolve_preset(config), overrides)
    else:
        raw = saved.to_dict()
        for item in overrides:
            apply_override(raw, item)
        requested = config_from_dict(raw, origin=f"{run_dir}/config.json + --set")
    check_same_model(saved, requested, run_dir)
    requested.train.out_dir = str(run_dir)
    return requested


def check_same_model(saved: Config, requested: Config, run_dir) -> None:
    """A checkpoint resumes only into the [model] it was trained with."""
    before, after = saved.to_dict()["model"], requested.to_dict()["model"]
    for key, value in before.items():
        if after[key] != value:
            raise UserError(
                f"the checkpoint in {run_dir} was trained with model.{key} = {value!r}, the requested config has "
                f"{after[key]!r}; resume with the run's own config (drop --config/--set model.*) or start a new run"
            )
