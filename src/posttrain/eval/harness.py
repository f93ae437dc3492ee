"""lm-evaluation-harness adapter: evaluate posttrain models and adapters with `lm_eval`.

    python -m posttrain.eval.harness install          # once per environment: the import hook
    lm_eval --model posttrain --model_args model=runs/sft,adapter=runs/sft/adapter --tasks hellaswag

`PosttrainLM` implements the three request types with posttrain's own scoring code
(posttrain.eval.lm), so `lm_eval` numbers and `posttrain eval` numbers come from the same
functions. lm-eval (0.4.x) finds models only through its registry, which has no plugin entry
points; `install` writes a `.pth` file into site-packages that adds a tiny import hook
(`posttrain.eval.lm_eval_hook`) registering the name `posttrain` lazily right after lm-eval has
registered its own models, so `--model hf` and every other built-in model keep working. Without
the hook, `python -m posttrain.eval.harness run <lm_eval args>` registers the model and runs
lm-eval's own CLI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lm_eval.models  # noqa: F401  -- lm-eval's built-in models first; see lm_eval_hook for why
from lm_eval.api.model import LM

from posttrain.eval import lm as L, lm_eval_hook
from posttrain.models.loading import load
from posttrain.eval.lm_eval_hook import write_pth


class PosttrainLM(LM):
    """`model_args`: model=DIR (required), adapter=DIR, dtype=fp32|bf16|fp16, device=auto|cpu|cuda,
    batch_size=N, trust_remote_code=false."""

    def __init__(self, model: str | None = None, adapter: str | None = None, dtype: str = "fp32",
                 device: str | None = None, batch_size: int | str | None = 16, trust_remote_code=False,
                 max_length: int | None = None, **_ignored):
        super().__init__()
        if not model:
            raise ValueError("lm_eval --model posttrain needs --model_args model=DIR[,adapter=DIR]")

        trust = str(trust_remote_code).lower() in ("1", "true", "yes")
        import torch

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "auto"  # lm_eval passes its own default ("cuda") even on machines without one
        self.model, self.tokenizer = load(model, adapter=adapter, dtype=dtype, device=device,
                                          trust_remote_code=trust)
        self.model.eval()
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> a fixed default
        self._max_length = int(max_length) if max_length else None
        self._name = str(model) + (f"+{adapter}" if adapter else "")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return L.loglikelihood(self.model, self.tokenizer, [r.args[:2] for r in requests], batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        scored = L.loglikelihood_rolling(self.model, self.tokenizer, [r.args[0] for r in requests],
                                         batch_size=self.batch_size)
        return [ll for ll, _ in scored]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # requests with the same generation settings are batched together; order is restored after
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kw = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kw.get("do_sample") and float(kw.get("temperature", 1.0) or 0.0) > 0:
                raise ValueError("PosttrainLM decodes greedily; drop do_sample/temperature from gen_kwargs")
            groups.setdefault((int(kw.get("max_gen_toks", 256)), tuple(until)), []).append(i)
        out: list[str] = [""] * len(requests)
        for (max_new, until), idx in groups.items():
            texts = L.generate(self.model, self.tokenizer, [requests[i].args[0] for i in idx],
                               max_new_tokens=max_new, stop=until, batch_size=self.batch_size)
            for i, t in zip(idx, texts):
                out[i] = t
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None


# Registered by its import path, as the hook does, never as a class object: run as
# `python -m posttrain.eval.harness` this module is `__main__`, and lm-eval's registry refuses a
# second, different object under the same name.
lm_eval_hook.register()


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:

        print(f"wrote {write_pth(argv[1] if len(argv) > 1 else None)}")
        return 0
    if argv[:1] == ["run"]:
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm_eval", *argv[1:]]
        cli_evaluate()
        return 0
    print("usage: python -m posttrain.eval.harness install [SITE_DIR] | run <lm_eval arguments>", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
