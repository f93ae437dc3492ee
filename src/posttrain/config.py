"""Typed run configuration: one schema per stage, YAML files and dotted overrides.

A run's configuration comes from three layers, later ones winning:

1. the schema's defaults (conservative: full fine-tuning at lr 2e-5, one epoch);
2. a YAML file (``--config run.yaml``);
3. dotted ``key=value`` overrides on the command line (``train.lr=1e-4``).

Every key is validated. An unknown key is an error that names the key and the
nearest valid one, e.g. ``unknown key 'train.learning_rate' (did you mean 'train.lr'?)``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.data.hub import ColumnMap, DatasetObject
from posttrain.models.adapters import ADAPTER_TYPES


# the metric sinks of `train.report_to` (posttrain.engine.monitor.SINKS; a test keeps the two equal)
REPORT_SINKS = ("tensorboard", "wandb", "mlflow")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_Strict = Section  # the name before the stages' copy was folded into this one


class MixConfig(Section):
    """General data blended into the training data to guard against forgetting."""

    data: Union[str, list[str], DatasetObject] = Field(
        description="General-purpose data (a file, or 'gym:regression' for the bundled general set)."
    )
    ratio: float = Field(0.2, gt=0.0, lt=1.0, description="Fraction of the final training mix drawn from `data`.")


class DataConfig(Section):
    train: Optional[Union[str, list[str], DatasetObject]] = Field(None, description="Training data: file(s) (.jsonl .json .parquet .csv .arrow, a save_to_disk folder), 'gym:TASK', 'hf:ORG/NAME[:SPLIT][@CONFIG]' (datasets.load_dataset), or a datasets.Dataset from Python.")
    eval: Optional[Union[str, list[str], DatasetObject]] = Field(None, description="Held-out data for evaluation and early stopping (the same kinds of source as `train`).")
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Which column holds each field posttrain reads: a preset (alpaca, qa, sharegpt) or a mapping such as {completion: output}; docs/data.md.")
    streaming: bool = Field(False, description="Stream hf: sources instead of downloading them whole (with data.limit, only the first rows are read).")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="When `eval` is unset, carve this fraction of `train` out as held-out data.")
    max_length: int = Field(1024, gt=1, description="Maximum tokens per example (and per packed row).")
    overflow: Literal["truncate", "drop"] = Field("truncate", description="What to do with examples longer than `max_length`; the count is always reported.")
    packing: bool = Field(False, description="Best-fit-decreasing packing into rows of `max_length` tokens, attention kept within each example. Always on for `cpt`.")
    padding_free: Optional[bool] = Field(None, description="Run each batch as rows of its examples side by side (no padding tokens), attention kept within each example: the same batches and loss as padded batches, with fewer tokens through the model (about 1.5x faster for SFT and DPO, docs/benchmarks.md). Default (null): on wherever it applies, off with `packing`, prompt or prefix tuning, and the reward and kto stages; false pads every batch to its longest example.")
    mix: Optional[MixConfig] = Field(None, description="General data mixed in at a ratio (see MixConfig).")
    format: Literal["auto", "text", "prompt_completion", "conversational"] = Field("auto", description="Row format; `auto` detects it from the fields.")
    chat_template: Optional[str] = Field(None, description="A Jinja chat template that replaces the tokenizer's own.")
    limit: Optional[int] = Field(None, gt=0, description="Use only the first N training rows (quick experiments).")
    audit: Literal["error", "warn", "off"] = Field("error", description="The loss-mask and chat-template audit of "
                                                   "the training data at the start of every stage that trains on "
                                                   "rendered chat or completion data (posttrain.data.audit; "
                                                   "`posttrain data inspect` shows it): error stops on a violation "
                                                   "with the example's origin, warn prints one warning, off skips it.")

    @field_validator("audit", mode="before")
    @classmethod
    def _off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare off as false


class TrainConfig(Section):
    batch_size: int = Field(8, gt=0, description="Examples (or packed rows) per micro-batch, per process.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step. Loss is normalized by the total loss tokens of the step.")
    epochs: float = Field(1.0, gt=0, le=100, description="Passes over the training data (ignored when `max_steps` is set).")
    max_steps: Optional[int] = Field(None, gt=0, description="Stop after this many optimizer steps.")
    lr: Optional[float] = Field(None, gt=0, description="Peak learning rate. Default: 2e-5 for full fine-tuning, 2e-4 for adapters.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's decoupled weight decay (Loshchilov & Hutter 2019); "
                                "not applied to biases and norms.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's (beta1, beta2) moment decay rates "
                                            "(Kingma & Ba 2015).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW's epsilon in the update's denominator.")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Linear warmup steps (overrides `warmup_ratio`).")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Warmup as a fraction of total steps.")
    schedule_steps: Optional[int] = Field(None, gt=0, description="Length of the learning-rate schedule (warmup_ratio's "
                                          "total too); default: the run's own steps. Longer than the run, the run is "
                                          "the first steps of that schedule and stops before its decay ends (the "
                                          "adviser's pilots: docs/advise.md).")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the global gradient norm; null disables clipping.")
    precision: Literal["fp32", "bf16", "auto"] = Field("fp32", description="fp32, or bf16 autocast with fp32 master "
                                                       "weights, or auto: bf16 where the device has bf16 matrix "
                                                       "kernels (a GPU with bf16, an AVX512 or AMX CPU), fp32 "
                                                       "elsewhere. The run's config.yaml records the choice.")
    seed: int = Field(42, description="Seeds model init of new parts, dropout and the data order.")
    eval_every: Optional[int] = Field(None, gt=0, description="Evaluate held-out loss every N steps (and at the end).")
    early_stopping_patience: Optional[int] = Field(None, gt=0, description="Stop after N evaluations without improvement; the best weights are restored.")
    early_stopping_min_delta: float = Field(0.0, ge=0.0, description="An evaluation improves on the best only "
                                            "when its loss is lower by more than this.")
    save_every: Optional[int] = Field(None, gt=0, description="Write a resumable checkpoint every N steps.")
    keep_last: int = Field(2, gt=0, description="Checkpoints to keep.")
    log_every: int = Field(1, gt=0, description="Write the training metrics to metrics.jsonl every N steps.")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward "
                                         "pass (Chen et al. 2016): less activation memory for about a third more time.")
    report_to: list[Literal[REPORT_SINKS]] = Field(default_factory=list, description="Extra metric sinks: tensorboard, wandb, mlflow (each logs the metrics and the resolved config; a missing package is skipped with a message). docs/training.md.")
    run_name: Optional[str] = Field(None, description="The run's name in W&B and MLflow (default: the output directory's name).")
    wandb_project: Optional[str] = Field(None, description="W&B project (default: $WANDB_PROJECT, else 'posttrain'); WANDB_MODE=offline works.")
    mlflow_tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a local file store in output_dir/mlruns).")
    mlflow_experiment: Optional[str] = Field(None, description="MLflow experiment name (default: 'posttrain').")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    progress: bool = Field(True, description="Show a progress bar.")
    distributed: Literal["auto", "ddp", "fsdp", "none"] = Field(
        "auto", description="Data parallelism under torchrun: auto picks DDP when the model fits replicated, else FSDP2.")
    cpu_offload: bool = Field(False, description="FSDP2: keep parameters and optimizer state on the CPU.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [] if v in ("", "none") else [v]
        return v

    @model_validator(mode="after")
    def _schedule_covers_the_run(self) -> "TrainConfig":
        if self.schedule_steps is not None and self.max_steps and self.schedule_steps < self.max_steps:
            raise ValueError(f"train.schedule_steps={self.schedule_steps} is shorter than train.max_steps="
                             f"{self.max_steps}: the schedule must cover the run (or leave it unset)")
        return self


class AdapterConfig(Section):
    type: Literal[ADAPTER_TYPES] = Field(
        "none", description="none (full fine-tuning), lora (Hu et al. 2021), dora (Liu et al. 2024), qlora (NF4 base, "
        "Dettmers et al. 2023), prompt (Lester et al. 2021) or prefix tuning (Li & Liang 2021); docs/adapters.md.")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: Optional[float] = Field(None, gt=0, description="LoRA alpha; default 2·r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA/DoRA input during training.")
    targets: Union[str, list[str]] = Field("all-linear", description="Module names, a regex, or 'all-linear' (output head excluded).")
    rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r.")
    num_virtual_tokens: int = Field(20, gt=0, description="Prompt and prefix tuning length.")
    init_text: Optional[str] = Field(None, description="Prompt tuning: initialise from this text's token embeddings.")
    prefix_projection: bool = Field(False, description="Prefix tuning: reparameterise through an MLP.")
    path: Optional[str] = Field(None, description="Start from an existing adapter directory (PEFT format).")


class EvalConfig(Section):
    regression_every: Optional[int] = Field(None, gt=0, description="Run the regression suite every N steps.")
    regression_suite: str = Field("regression", description="Suite for the forgetting guard: a name, a YAML path, or lm-evaluation-harness tasks "
                                  "as lm_eval:TASK[@N][,TASK[@N]...] (docs/eval.md).")
    regression_max_drop: Optional[float] = Field(None, gt=0, description="Stop (and restore the best) when the regression score drops by more than this (0-1 scale).")
    guard: Literal["on", "off"] = Field("on", description="The default forgetting guard in every training stage: "
                                        "drift from the starting model (KL per token on its own continuations of "
                                        "bundled general prompts) and the general-text perplexity change, checked "
                                        "within `guard_budget` of the wall time; past a limit the run stops and "
                                        "publishes the last checked weights within the limits. docs/eval.md.")
    guard_max_drift_kl: Optional[float] = Field(0.5, gt=0, description="Stop and roll back when drift from the "
                                                "start passes this (nats per token; from the gym calibration, "
                                                "docs/eval.md); null: only log it.")
    guard_max_ppl_change: Optional[float] = Field(1.0, gt=0, description="Stop and roll back when general-text "
                                                  "perplexity rises by more than this share (1.0 = doubled); null: "
                                                  "only log it.")
    guard_budget: float = Field(0.10, gt=0, lt=1, description="Share of the run's wall time the guard may take, its "
                                "set-up (building the base's reference when it is not cached) included; sets how "
                                "often it checks.")
    guard_prompts: Optional[int] = Field(64, gt=0, description="Drift prompts per check, spread over the 300 bundled "
                                         "ones (null: all 300).")
    guard_text: Optional[str] = Field(None, description="General text for the perplexity check (a file or gym:TASK; "
                                      "its loss tokens are scored). Default: `data.mix.data` when the run mixes "
                                      "general data in, else the bundled general-text sample.")
    guard_rollback: bool = Field(True, description="When a limit is crossed, restore the trainable weights of the "
                                 "last check within the limits (kept on the CPU); false: only stop.")

    @field_validator("guard", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class RunConfig(Section):
    """Configuration shared by all training stages."""

    stage: str = Field("sft", description="The stage this config is for (set by the command).")
    model: Optional[str] = Field(None, description="Local HF directory or hub name of the starting model.")
    tokenizer: Optional[str] = Field(None, description="Tokenizer path, when it differs from `model`.")
    trust_remote_code: bool = Field(False, description="Allow a checkpoint's own Python code to run. Off unless asked.")
    allow_pickle: bool = Field(False, description="Allow .bin (pickle) weights. Off: safetensors only.")
    output_dir: str = Field("runs/latest", description="The run directory: config.yaml, metrics.jsonl, checkpoints/, "
                            "the final model/ or adapter/, report.html and manifest.json (written last).")
    data: DataConfig = Field(default_factory=DataConfig, description="What to train on and how to batch it.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The engine: optimizer, schedule, precision, "
                               "evaluation, checkpoints, distribution.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Parameter-efficient fine-tuning.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation during training and the forgetting "
                             "guard.")

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.stage == "cpt" and not self.data.packing:
            # continued pretraining is always packed; say so in the resolved config
            object.__setattr__(self.data, "packing", True)
        if self.data.padding_free is None:  # fast by default where it changes neither batches nor loss
            on = not self.data.packing and self.adapter.type not in ("prompt", "prefix") and \
                self.stage not in ("reward", "kto")
            object.__setattr__(self.data, "padding_free", on)
        if self.data.padding_free and self.data.packing:
            raise ValueError("data.padding_free and data.packing both set: choose one (packing already has no "
                             "padding; padding_free keeps the batches of data.packing: false)")
        if self.data.padding_free and self.adapter.type in ("prompt", "prefix"):
            raise ValueError(f"data.padding_free does not work with adapter.type={self.adapter.type}: its virtual "
                             "tokens are added once per row, not per example; set data.padding_free: false")
        if self.train.early_stopping_patience and not self.train.eval_every:
            raise ValueError("train.early_stopping_patience needs train.eval_every (how often to evaluate)")
        return self

    def default_lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return 2e-5 if self.adapter.type == "none" else 2e-4


STAGE_SCHEMAS: dict[str, type[RunConfig]] = {"sft": RunConfig, "cpt": RunConfig}


def register_stage_schema(name: str, schema: type[RunConfig]) -> None:
    """Later stages (dpo, ppo, ...) register their schema, a subclass of RunConfig."""
    STAGE_SCHEMAS[name] = schema


# ---------------------------------------------------------------- loading


def _all_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in schema.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        ann = field.annotation
        for t in getattr(ann, "__args__", (ann,)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                keys.extend(_all_keys(t, full + "."))
    return keys


# names that other trainers use for our keys; difflib alone would not find these
ALIASES = {
    "learning_rate": "lr", "lr_scheduler_type": "schedule", "scheduler": "schedule", "lr_schedule": "schedule",
    "gradient_accumulation_steps": "grad_accum", "gradient_accumulation": "grad_accum",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size", "bs": "batch_size",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "max_seq_length": "max_length", "max_seq_len": "max_length",
    "seq_len": "max_length", "warmup": "warmup_steps", "bf16": "precision", "fp16": "precision", "dtype": "precision",
    "dataset": "train", "train_file": "train", "eval_file": "eval", "output": "output_dir", "out": "output_dir",
    "max_grad_norm_clip": "max_grad_norm", "clip": "max_grad_norm", "rank": "r", "lora_alpha": "alpha",
    "lora_dropout": "dropout", "target_modules": "targets", "save_steps": "save_every", "eval_steps": "eval_every",
}


def suggest(key: str, schema: type[BaseModel]) -> str:
    keys = _all_keys(schema)
    section, _, last = key.rpartition(".")
    prefix = f"{section}." if section else ""
    alias = ALIASES.get(last)
    if alias and f"{prefix}{alias}" in keys:
        return f" (did you mean '{prefix}{alias}'?)"
    same_section = [k for k in keys if k.rpartition(".")[0] == section]
    best = difflib.get_close_matches(key, same_section, n=1, cutoff=0.6) or \
        difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f" (did you mean '{best[0]}'?)" if best else ""


def parse_value(text: str) -> Any:
    """Parse an override's value as YAML, so `1e-4`, `true`, `[a, b]` get their types."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads '1e-4' as a string; accept it as a float
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def apply_override(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def _format_errors(err: ValidationError, schema: type[BaseModel], source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}'{suggest(loc, schema)}")
        else:
            got = e.get("input")
            got_s = f", got {got!r}" if not isinstance(got, dict) else ""
            lines.append(f"{loc}: {e['msg']}{got_s}")
    return f"invalid configuration ({source}):\n  " + "\n  ".join(lines)


def load_config(
    stage: str,
    path: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    base: Optional[dict] = None,
) -> RunConfig:
    """Build and validate a stage's config from defaults, an optional YAML file and `key=value` overrides.

    The stage's schema must be registered (`register_stage_schema`, done when its stage module is
    imported); `posttrain.stages.load_config` imports the stage module first.
    """
    schema = STAGE_SCHEMAS.get(stage)
    if schema is None:
        raise ConfigError(f"unknown stage '{stage}'; known stages: {', '.join(sorted(STAGE_SCHEMAS))}")
    tree: dict = dict(base or {})
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        tree.update(loaded)
        source = str(p)
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' must look like key=value (e.g. train.lr=1e-4)")
        k, v = ov.split("=", 1)
        apply_override(tree, k.strip(), parse_value(v))
        source = f"{source} + overrides" if "overrides" not in source else source
    declared = tree.pop("stage", stage)
    if declared != stage:
        raise ConfigError(f"{source}: stage is '{declared}' but the command is '{stage}'")
    tree["stage"] = stage
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, schema, source)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
