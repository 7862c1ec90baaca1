"""VLM tier on vLLM in-process: continuous batching, prefix caching, quantisation, speculative
decoding, all passed through from YAML. GPU extra: `pip install vllm` (imported only when a config
uses this backend).

Origin: any vLLM-supported multimodal chat model: Qwen2.5-VL (`Qwen/Qwen2.5-VL-7B-Instruct`,
Apache-2.0; `-3B-` Qwen Research licence), InternVL3 (`OpenGVLab/InternVL3-8B`, MIT; needs
`trust_remote_code`), Phi-4-multimodal (MIT), Gemma 3 (Gemma terms), their FP8/AWQ variants.
Licence: that of the checkpoint.

The prompt is the model's own chat template (from its processor) with one image and the yes/no
question; vLLM generates exactly one token with `logprobs=top_logprobs` (and optionally only the
yes/no tokens allowed), and the probability comes from the log-probabilities of the yes/no token
ids (`models.vlm_common`). The shared question prefix makes prefix caching effective.

Device: vLLM owns its GPU(s) through its own engine process. A tier placed on `cuda:N` starts the
engine with CUDA_VISIBLE_DEVICES=N, set only while the engine is being created; the tier declares
`load_alone`, so the engine creates it before any other tier loads and with none loading beside
it: no other tier can see the changed variable, and vLLM finds its card's memory still free (it
refuses to start when free memory < gpu_memory_utilization x total). If creating the engine
initialised CUDA in the miner's own process while the variable was changed, the miner's view of
the cards would stay narrowed for every later tier: the tier refuses to load then, naming the way
out (the `vlm_openai` tier against `vllm serve` in its own process). `gpu_memory_utilization` is
the fraction of that whole device vLLM takes; the placement planner books exactly that.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional, Sequence

from PIL import Image

from cascade.errors import ConfigError
from cascade.tier import MemoryNeeds, Tier, TierOutput
from models.param_count import count_parameters
from models.vlm_common import (VLMOptions, answer_token_ids, chat_messages, prob_from_id_logprobs,
                               shrink)

_VLLM_DTYPE = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float32": "float32", "fp32": "float32"}


@dataclass(frozen=True)
class Options(VLMOptions):
    """Settings of a `vlm_vllm` tier (YAML `options:`), passed to `vllm.LLM(...)`."""

    # vLLM quantization method ("fp8", "awq", "gptq", "bitsandbytes", ...; None = as saved).
    quantization: Optional[str] = None
    # Longest sequence (prompt + 1 token); images of `max_image_side` need about 1-1.3k tokens.
    max_model_len: int = 4096
    # Fraction of the device's memory vLLM may take (weights + KV cache + activations).
    gpu_memory_utilization: float = 0.45
    # Reuse the KV cache of the shared prompt prefix across requests.
    enable_prefix_caching: bool = True
    # vLLM speculative_config mapping (e.g. {method: eagle3, model: ..., num_speculative_tokens: 3}).
    speculative_config: Optional[dict[str, Any]] = None
    # Multimodal items per prompt.
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 1})
    # Most sequences in one engine step.
    max_num_seqs: int = 32
    # Let only the yes/no tokens be generated (logprobs are still read from the raw distribution).
    restrict_to_answer_tokens: bool = True
    # Processor kwargs (e.g. {max_pixels: 802816} for Qwen2.5-VL).
    mm_processor_kwargs: Optional[dict[str, Any]] = None
    # Run custom model code from the hub (InternVL3 needs it).
    trust_remote_code: bool = False
    # Disable CUDA graphs (slower, less memory, faster start).
    enforce_eager: bool = False
    # Any other vllm.LLM keyword arguments.
    engine_args: dict[str, Any] = field(default_factory=dict)
    # Raw prompt with a `{question}` placeholder, for models whose chat template does not take
    # an image part (InternVL3: "<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n").
    # None: the model's own chat template.
    prompt_template: Optional[str] = None

    def validate(self, source: str, prefix: str) -> None:
        super().validate(source, prefix)
        if not 0.05 <= self.gpu_memory_utilization <= 0.98:
            raise ConfigError(source, f"{prefix}.gpu_memory_utilization", "a number in [0.05, 0.98]",
                              self.gpu_memory_utilization)
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise ConfigError(source, f"{prefix}.prompt_template", "a string containing {question}",
                              self.prompt_template)
        if self.max_model_len < 256:
            raise ConfigError(source, f"{prefix}.max_model_len", "an integer >= 256",
                              self.max_model_len)


@contextmanager
def _visible_device(device: str) -> Iterator[bool]:
    """Pin vLLM's engine process to one GPU while it is created (`cuda:1` -> CUDA_VISIBLE_DEVICES=1);
    yields whether the variable had to change."""
    if not device.startswith("cuda:"):
        yield False
        return
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    index = device.split(":", 1)[1]
    if old:  # already restricted: cuda:N is the N-th visible device
        visible = [d.strip() for d in old.split(",")]
        index = visible[int(index)] if int(index) < len(visible) else index
    os.environ["CUDA_VISIBLE_DEVICES"] = index
    try:
        yield old != index
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def _cuda_initialised() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_initialized())


def first_token_logprobs(request_output: Any) -> dict[int, float]:
    """{token_id: logprob} of the FIRST generated token of a `vllm.RequestOutput` (the answer;
    `CompletionOutput.logprobs` holds one {token_id: Logprob} mapping per generated token)."""
    positions = request_output.outputs[0].logprobs
    if not positions:
        raise ValueError("vLLM returned no log-probabilities (SamplingParams.logprobs unset?)")
    return {int(t): float(lp.logprob) for t, lp in positions[0].items()}


def engine_kwargs(model: str, dtype: str, options: Options) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` for this tier (pure, so it is testable without vllm)."""
    kwargs: dict[str, Any] = {
        "model": model,
        "dtype": _VLLM_DTYPE.get(dtype, "auto"),
        "max_model_len": options.max_model_len,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "enable_prefix_caching": options.enable_prefix_caching,
        "limit_mm_per_prompt": dict(options.limit_mm_per_prompt),
        "max_num_seqs": options.max_num_seqs,
        "trust_remote_code": options.trust_remote_code,
        "enforce_eager": options.enforce_eager,
    }
    if options.quantization:
        kwargs["quantization"] = options.quantization
    if options.speculative_config:
        kwargs["speculative_config"] = dict(options.speculative_config)
    if options.mm_processor_kwargs:
        kwargs["mm_processor_kwargs"] = dict(options.mm_processor_kwargs)
    kwargs.update(options.engine_args)
    return kwargs


class VLLMTier(Tier):
    """Yes/no roadwork question scored from next-token log-probabilities, on vLLM."""

    Options = Options
    load_alone = True  # it sets CUDA_VISIBLE_DEVICES while its engine starts; see the module docstring

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.llm = None
        self.sampling = None
        self.prompt: Optional[str] = None
        self.yes_ids: list[int] = []
        self.no_ids: list[int] = []

    def load(self, device: str) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise RuntimeError("backend 'vlm_vllm' needs the GPU extra: pip install vllm") from exc
        path = self.spec.checkpoint_path()
        if not path:
            raise RuntimeError(f"tier {self.name} (vlm_vllm) needs a 'checkpoint:'")
        self.device = "cuda:0" if device == "cuda" else device
        initialised_before = _cuda_initialised()
        with _visible_device(self.device) as pinned:
            self.llm = LLM(**engine_kwargs(path, self.spec.dtype, self.options))
        if pinned and not initialised_before and _cuda_initialised():
            raise RuntimeError(
                f"tier {self.name}: creating the vLLM engine initialised CUDA in the miner process while "
                f"CUDA_VISIBLE_DEVICES was narrowed to {self.device}'s card, so every other tier would see "
                "the wrong cards; run vLLM in its own process instead (`vllm serve` with its own "
                "CUDA_VISIBLE_DEVICES and a `vlm_openai` tier, see docs/gpu.md)")
        tokenizer = self.llm.get_tokenizer()
        self.yes_ids, self.no_ids = answer_token_ids(tokenizer)
        self.prompt = self._chat_prompt(path, tokenizer)
        extra = {"allowed_token_ids": self.yes_ids + self.no_ids} \
            if self.options.restrict_to_answer_tokens else {}
        self.sampling = SamplingParams(max_tokens=1, temperature=0.0,
                                       logprobs=self.options.top_logprobs, **extra)

    def _chat_prompt(self, path: str, tokenizer: Any) -> str:
        """The model's chat template applied to [image, question] (processor's, else tokenizer's)."""
        if self.options.prompt_template is not None:
            return self.options.prompt_template.replace("{question}", self.options.question)
        messages = chat_messages(self.options, {"type": "image"})
        try:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(
                path, trust_remote_code=self.options.trust_remote_code)
            return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - some models ship the template on the tokenizer only
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _batch(self, images: list[Image.Image]) -> list[TierOutput | Exception]:
        requests = [{"prompt": self.prompt,
                     "multi_modal_data": {"image": shrink(im, self.options.max_image_side)}}
                    for im in images]
        outputs = self.llm.generate(requests, sampling_params=self.sampling, use_tqdm=False)
        results: list[TierOutput | Exception] = []
        for out in outputs:
            try:
                prob, evidence = prob_from_id_logprobs(first_token_logprobs(out), self.yes_ids, self.no_ids)
                results.append(TierOutput(prob=prob, evidence=evidence))
            except Exception as exc:  # noqa: BLE001 - per-item error is the contract
                results.append(exc)
        return results

    def predict(self, images: Sequence[Image.Image]) -> list[TierOutput | Exception]:
        if self.llm is None:
            raise RuntimeError(f"tier {self.name} predict() before load()")
        try:
            return self._batch(list(images))
        except Exception as exc:  # noqa: BLE001 - engine-level failure: every slot carries it
            return [exc for _ in images]

    def memory_needs(self) -> MemoryNeeds:
        """vLLM takes gpu_memory_utilization x the whole card (weights, KV cache, activations);
        the weights are counted from the checkpoint's config where it is on disk."""
        counted = count_parameters(self.spec, "AutoModelForImageTextToText",
                                   trust_remote_code=self.options.trust_remote_code)
        fraction = self.options.gpu_memory_utilization
        return replace(counted, device_fraction=fraction) if counted else MemoryNeeds(device_fraction=fraction)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        del llm
