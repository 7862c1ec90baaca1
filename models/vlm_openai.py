"""VLM tier through an OpenAI-compatible chat endpoint (a vLLM / SGLang server, possibly on
another machine).

Origin: whatever model the server serves (e.g. `vllm serve Qwen/Qwen2.5-VL-7B-Instruct`);
licence: that of the served checkpoint. The miner holds no weights for this tier, so `models
pull` skips it; the tier's `checkpoint` is the served model name.

Each image is sent as a JPEG data URL with the yes/no question, `max_tokens: 1`, `logprobs: true`
and `top_logprobs`; the probability comes from the top log-probabilities of the one generated
token (`models.vlm_common`). The base URL and the API key are read from environment variables
whose NAMES the config gives, so no secret is ever written into a config file. Requests of a
batch go out in parallel from the worker thread (stdlib urllib, no event loop of its own).
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

from PIL import Image

from cascade.errors import ConfigError
from cascade.tier import Tier, TierOutput
from models.vlm_common import VLMOptions, chat_messages, prob_from_top_logprobs, shrink


@dataclass(frozen=True)
class Options(VLMOptions):
    """Settings of a `vlm_openai` tier (YAML `options:`); see VLMOptions for the rest."""

    # Name of the environment variable holding the server's base URL (e.g. http://10.0.0.5:8000).
    base_url_env: str = "NATIX_VLM_BASE_URL"
    # Name of the environment variable holding the API key (unset or empty: no Authorization header).
    api_key_env: str = "NATIX_VLM_API_KEY"
    # Served model name (default: the tier's `checkpoint`).
    model: Optional[str] = None
    # Per-request timeout in seconds.
    request_timeout_s: float = 8.0
    # Parallel requests per batch.
    concurrency: int = 8
    # JPEG quality of the image sent to the server.
    jpeg_quality: int = 90
    # Check at load that the server answers /v1/models and serves `model`.
    check_model_at_load: bool = True

    def validate(self, source: str, prefix: str) -> None:
        super().validate(source, prefix)
        if self.concurrency < 1:
            raise ConfigError(source, f"{prefix}.concurrency", "an integer >= 1", self.concurrency)
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(source, f"{prefix}.jpeg_quality", "an integer in [1, 100]",
                              self.jpeg_quality)


def api_root(base_url: str) -> str:
    """`http://host:8000`, `.../`, `.../v1` all -> `http://host:8000/v1`."""
    root = base_url.strip().rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def data_url(image: Image.Image, quality: int) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def top_logprobs_of(response: dict) -> list[tuple[str, float]]:
    """(token, logprob) pairs of the first generated token of an OpenAI chat completion."""
    try:
        first = response["choices"][0]["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"response has no logprobs for the first token: {str(response)[:300]}") from exc
    pairs = [(t["token"], float(t["logprob"])) for t in first.get("top_logprobs") or []]
    chosen = (first.get("token"), first.get("logprob"))
    if chosen[0] is not None and chosen[1] is not None and chosen[0] not in {t for t, _ in pairs}:
        pairs.append((chosen[0], float(chosen[1])))
    return pairs


class OpenAIVLMTier(Tier):
    """Yes/no roadwork question to a remote OpenAI-compatible VLM server."""

    Options = Options

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self._root: Optional[str] = None
        self._headers: dict[str, str] = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self.model_name = self.options.model or spec.checkpoint

    def load(self, device: str) -> None:
        base = os.environ.get(self.options.base_url_env, "").strip()
        if not base:
            raise RuntimeError(f"tier {self.name}: environment variable {self.options.base_url_env} "
                               "is not set (base URL of the OpenAI-compatible VLM server)")
        if not self.model_name:
            raise RuntimeError(f"tier {self.name}: set 'checkpoint' or options.model to the served "
                               "model name")
        self._root = api_root(base)
        self._headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.options.api_key_env, "").strip()
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._pool = ThreadPoolExecutor(max_workers=self.options.concurrency,
                                        thread_name_prefix=f"vlm-openai-{self.name}")
        if self.options.check_model_at_load:
            served = [m.get("id") for m in self._request("GET", "/models").get("data", [])]
            if self.model_name not in served:
                raise RuntimeError(f"tier {self.name}: server {self._root} does not serve "
                                   f"{self.model_name!r}; it serves {served}")

    def _request(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self._root + path, data=data, method=method,
                                     headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=self.options.request_timeout_s) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise RuntimeError(f"{method} {self._root}{path}: HTTP {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise RuntimeError(f"{method} {self._root}{path}: {exc.reason}") from None

    def request_body(self, image: Image.Image) -> dict:
        image = shrink(image, self.options.max_image_side)
        part = {"type": "image_url", "image_url": {"url": data_url(image, self.options.jpeg_quality)}}
        return {"model": self.model_name, "messages": chat_messages(self.options, part),
                "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                "top_logprobs": self.options.top_logprobs}

    def _one(self, image: Image.Image) -> TierOutput:
        response = self._request("POST", "/chat/completions", self.request_body(image))
        prob, evidence = prob_from_top_logprobs(top_logprobs_of(response))
        return TierOutput(prob=prob, evidence=evidence)

    def predict(self, images: Sequence[Image.Image]) -> list[TierOutput | Exception]:
        if self._pool is None:
            raise RuntimeError(f"tier {self.name} predict() before load()")
        futures = [self._pool.submit(self._one, im) for im in images]
        results: list[TierOutput | Exception] = []
        for fut in futures:
            try:
                results.append(fut.result())
            except Exception as exc:  # noqa: BLE001 - per-item error is the contract
                results.append(exc)
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
