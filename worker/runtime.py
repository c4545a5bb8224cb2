"""The model runtime of a worker: MedGemma (or the tiny test checkpoint) loaded once, batched JSON output.

One code path for every checkpoint: ``AutoProcessor`` and ``AutoModelForImageTextToText`` from a Hub id or a
local folder, or ``AutoModelForCausalLM`` for a text-only checkpoint such as medgemma-27b-text-it. Decoding is
greedy and constrained by llguidance to the JSON schema of the request's pydantic model; the output is then
validated by that model, and a failure is a result with an error, never an exception. A result says when
it was cut: at ``max_new_tokens`` (``cut``), or in a free-text string the grammar closed at its maxLength
(``capped``).

Before a model loads, its weights' size (from its config, on the meta device) is checked against the free
memory of the device it is placed on, so a worker refuses at start with a clear error instead of failing
its first job with an out-of-memory error.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import llguidance
import llguidance.hf
import psutil
import torch
from PIL import Image
from pydantic import BaseModel
from pydantic import ValidationError
from transformers import AutoConfig
from transformers import AutoModelForCausalLM
from transformers import AutoModelForImageTextToText
from transformers import AutoProcessor
from transformers import LogitsProcessor
from transformers import LogitsProcessorList
from transformers import PreTrainedModel
from transformers import ProcessorMixin
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from fhir_mappings.ai_cards import model_identifier
from fhir_mappings.model_outputs import capped_strings

# Free whitespace between JSON tokens lets a model loop on blank lines until the token limit.
_JSON_OPTIONS: llguidance.JsonCompileOptions = {"whitespace_flexible": False}
CUT_ERROR = "output did not validate: cut at max_new_tokens"
#: Free memory a device must have beyond the weights: activations, the KV cache of a batch of prompts
#: (27B: ~0.5 MB a token, so 8 prompts of 2k tokens take ~8 GB), CUDA's own context and allocator slack.
MEMORY_HEADROOM = 0.25


class PlacementError(RuntimeError):
    """A model does not fit the free memory of the device it is placed on."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt: system and user turns, images shown before the user text, and the schema to answer in."""

    system_prompt: str
    user_text: str
    output_schema: type[BaseModel]
    images: Sequence[Image.Image] = ()
    max_new_tokens: int = 768

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")


@dataclass(frozen=True)
class GenerationResult:
    """What one request produced: the raw text, and either the validated output or why there is none.

    ``generated_tokens`` counts the stop token; ``seconds`` is the wall time of the whole batched call, and
    ``batch_size`` the number of requests in it. ``cut``: the output reached ``max_new_tokens`` without its
    stop token; ``capped``: the paths of free-text strings that fill their maxLength (``capped_strings``).
    """

    text: str
    output: BaseModel | None
    error: str | None
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    batch_size: int
    cut: bool = False
    capped: tuple[str, ...] = ()


@dataclass
class ModelRuntime:
    """A loaded processor and model, with llguidance's view of the tokenizer and a grammar per schema."""

    model_id: str
    model_version: str
    processor: Any
    model: PreTrainedModel
    device: torch.device
    dtype: torch.dtype
    accepts_images: bool
    _eos_ids: list[int] = field(init=False)
    _vocab_size: int = field(init=False)
    _ll_tokenizer: llguidance.LLTokenizer = field(init=False)
    _executor: llguidance.LLExecutor = field(default_factory=llguidance.LLExecutor, init=False)
    _matchers: dict[type[BaseModel], llguidance.LLMatcher] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        shipped = self.model.generation_config
        eos = shipped.eos_token_id if shipped.eos_token_id is not None else self._tokenizer.eos_token_id
        self._eos_ids = [eos] if isinstance(eos, int) else list(eos)
        # The logits are as wide as the embedding, which Gemma pads past the tokenizer (262,208 > 262,145);
        # llguidance refuses a vocabulary smaller than the tokenizer, which some checkpoints have (262,144
        # rows for 262,145 entries, the last the image token): the mask is sliced to the logits' width.
        self._vocab_size = max(self.model.config.get_text_config().vocab_size, len(self._tokenizer))
        # Seconds for Gemma's 262k vocabulary, so it is built with the model rather than on the first request.
        self._ll_tokenizer = llguidance.hf.from_tokenizer(
            self._tokenizer, n_vocab=self._vocab_size, eos_token=self._eos_ids
        )

    @property
    def _tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Return one result per request, in order, from a single batched greedy ``generate`` call."""
        if not requests:
            return []
        if not self.accepts_images and any(request.images for request in requests):
            raise ValueError(f"{self.model_id} is a text-only model; it cannot read images")
        started = time.perf_counter()
        limits = [request.max_new_tokens for request in requests]
        # One generate at a time: the processor's padding side and the grammar cache are shared state.
        with self._lock:
            matchers = [self._matcher(request.output_schema) for request in requests]
            inputs = self._encode(requests)
            prompt_length = inputs["input_ids"].shape[1]
            constraint = _GrammarConstraint(
                matchers, limits, self._eos_ids, prompt_length, self._executor, self._vocab_size
            )
            with torch.inference_mode():
                # The checkpoints ship sampling defaults (do_sample, top_k 64, top_p 0.95). An explicit
                # do_sample=False overrides them, and transformers then does not warn about the unused ones.
                sequences = self.model.generate(
                    **inputs,
                    do_sample=False,
                    max_new_tokens=max(limits),
                    eos_token_id=self._eos_ids,
                    pad_token_id=self._tokenizer.pad_token_id,
                    logits_processor=LogitsProcessorList([constraint]),
                )
        seconds = time.perf_counter() - started
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        new_tokens = sequences[:, prompt_length:].tolist()
        return [
            self._result(request, row, prompt_tokens[index], constraint.errors[index], seconds, len(requests))
            for index, (request, row) in enumerate(zip(requests, new_tokens, strict=True))
        ]

    def _encode(self, requests: list[GenerationRequest]) -> Any:
        conversations = []
        for request in requests:
            # As the model card's examples: the instruction, then the image ("Describe this X-ray", image).
            user_content: list[dict[str, Any]] = [{"type": "text", "text": request.user_text}]
            user_content += [{"type": "image", "image": image} for image in request.images]
            conversations.append(
                [
                    {"role": "system", "content": [{"type": "text", "text": request.system_prompt}]},
                    {"role": "user", "content": user_content},
                ]
            )
        # Decoder-only generation appends to the right end of every row, so padding must go on the left.
        self._tokenizer.padding_side = "left"
        # A processor takes tokenizer options in processor_kwargs, a bare tokenizer (text-only models) as is.
        padding = (
            {"processor_kwargs": {"padding": True}}
            if isinstance(self.processor, ProcessorMixin)
            else {"padding": True}
        )
        inputs = self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            # Chart text is data: "<end_of_turn>" or "<start_of_image>" in it must not become control tokens.
            sanitize_control_tokens=True,
            **padding,
        )
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _matcher(self, schema: type[BaseModel]) -> llguidance.LLMatcher:
        """Return a fresh matcher for ``schema``, copied from one compiled on first use."""
        template = self._matchers.get(schema)
        if template is None:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema.model_json_schema(), overrides=_JSON_OPTIONS
            )
            template = llguidance.LLMatcher(self._ll_tokenizer, grammar)
            if template.is_error():
                raise ValueError(f"schema {schema.__name__} is not a valid grammar: {template.get_error()}")
            self._matchers[schema] = template
        return template.deep_copy()

    def _result(
        self,
        request: GenerationRequest,
        row: list[int],
        prompt_tokens: int,
        constraint_error: str | None,
        seconds: float,
        batch_size: int,
    ) -> GenerationResult:
        produced = row[: request.max_new_tokens]
        stop = next((i for i, token in enumerate(produced) if token in self._eos_ids), None)
        answer = produced if stop is None else produced[:stop]
        text = self._tokenizer.decode(answer, skip_special_tokens=True)
        generated_tokens = len(produced) if stop is None else stop + 1
        output: BaseModel | None = None
        error = constraint_error
        if error is None:
            try:
                output = request.output_schema.model_validate_json(text)
            except ValidationError as invalid:
                error = CUT_ERROR if stop is None else _describe(invalid)
        return GenerationResult(
            text=text,
            output=output,
            error=error,
            prompt_tokens=prompt_tokens,
            generated_tokens=generated_tokens,
            seconds=seconds,
            batch_size=batch_size,
            cut=stop is None and output is None,
            capped=tuple(capped_strings(request.output_schema, output)) if output is not None else (),
        )


def load_runtime(
    model_ref: str,
    revision: str | None,
    device: str,
    hf_token: str | None = None,
    num_threads: int | None = None,
) -> ModelRuntime:
    """Return the processor and model of ``model_ref`` (Hub id or folder) loaded for inference on ``device``.

    ``device`` is ``auto`` (CUDA in bfloat16 when available, else CPU in float32), ``cpu``, ``cuda`` or
    ``cuda:N``. ``num_threads`` caps torch's CPU threads, for worker processes that share a host.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    placement = plan_placement(model_ref, revision, device, hf_token)
    placement.check()
    torch_device, dtype = placement.device, placement.dtype
    hub = {"revision": revision, "token": hf_token}
    config = AutoConfig.from_pretrained(model_ref, **hub)
    accepts_images = type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    model_class = AutoModelForImageTextToText if accepts_images else AutoModelForCausalLM
    model = model_class.from_pretrained(
        model_ref, config=config, dtype=dtype, device_map=str(torch_device), **hub
    )
    model.eval()
    processor = AutoProcessor.from_pretrained(model_ref, **hub)
    return ModelRuntime(
        model_id=model_ref,
        model_version=revision or _config_version(config),
        processor=processor,
        model=model,
        device=torch_device,
        dtype=dtype,
        accepts_images=accepts_images,
    )


@dataclass(frozen=True)
class Placement:
    """Where a model goes and whether it fits: its weights' bytes against the device's free memory."""

    model_ref: str
    device: torch.device
    dtype: torch.dtype
    weight_bytes: int
    free_bytes: int

    @property
    def needed_bytes(self) -> int:
        """Return the free memory the model needs: its weights and ``MEMORY_HEADROOM`` more."""
        return int(self.weight_bytes * (1 + MEMORY_HEADROOM))

    def describe(self) -> str:
        """Return one line: which model on which device, its size and the memory free there."""
        name = model_identifier(self.model_ref)
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"{name} on {self.device} ({_gib(self.weight_bytes)} of {dtype} weights, "
            f"{_gib(self.free_bytes)} free)"
        )

    def check(self) -> None:
        """Raise PlacementError, saying what to change, when the model does not fit its device."""
        if self.free_bytes >= self.needed_bytes:
            return
        raise PlacementError(
            f"{model_identifier(self.model_ref)} needs {_gib(self.needed_bytes)} on {self.device} "
            f"({_gib(self.weight_bytes)} of weights and {MEMORY_HEADROOM:.0%} headroom) but "
            f"{_gib(self.free_bytes)} is free: place it on another device (MEDGEMMA_CDS_TEXT_DEVICE / "
            "MEDGEMMA_CDS_IMAGE_DEVICE, e.g. cuda:1) or free that one"
        )


def plan_placement(
    model_ref: str, revision: str | None, device: str, hf_token: str | None = None
) -> Placement:
    """Return where ``model_ref`` would load for a ``device`` setting, with its size and the free memory.

    The size comes from the config alone (the model built on the meta device), so nothing is loaded.
    """
    torch_device = resolve_device(device)
    dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    try:
        config = AutoConfig.from_pretrained(model_ref, revision=revision, token=hf_token)
    except OSError as error:  # transformers' error for a model neither on disk, in the cache nor on a hub
        raise PlacementError(
            f"cannot read {model_identifier(model_ref)}'s config ({type(error).__name__}): point the model "
            "setting (MEDGEMMA_CDS_TEXT_MODEL / MEDGEMMA_CDS_IMAGE_MODEL) at a local checkpoint folder, or "
            "download the model into the Hugging Face cache first"
        ) from None
    model_class = (
        AutoModelForImageTextToText
        if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
        else AutoModelForCausalLM
    )
    with torch.device("meta"):
        shape = model_class.from_config(config)
    # Tied weights (Gemma's embedding and output layer) are one tensor, counted once.
    weights = {id(tensor): tensor for tensor in (*shape.parameters(), *shape.buffers())}
    weight_bytes = sum(
        tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
        for tensor in weights.values()
    )
    return Placement(model_ref, torch_device, dtype, weight_bytes, free_memory(torch_device))


def plan_placement_apart(
    model_ref: str, revision: str | None, device: str, hf_token: str | None = None
) -> Placement:
    """Return ``plan_placement``, asked in a fresh process unless the device is the CPU.

    Reading a GPU's free memory initialises CUDA, and CUDA initialised in a worker's parent process breaks
    the prefork children that then load the model.
    """
    if device == "cpu":
        return plan_placement(model_ref, revision, device, hf_token)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        return fresh.submit(plan_placement, model_ref, revision, device, hf_token).result()


def free_memory(device: torch.device) -> int:
    """Return the bytes free on ``device``: CUDA's own count for a GPU, available RAM for the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def resolve_device(device: str) -> torch.device:
    """Return the torch device for a device setting, ``auto`` meaning CUDA when there is a GPU; a bare
    ``cuda`` is GPU 0 (the one a fresh process uses), named so messages say which card."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    return torch.device("cuda", 0) if resolved.type == "cuda" and resolved.index is None else resolved


def _gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _config_version(config: Any) -> str:
    """Return the Hub commit the config came from, else its ``_name_or_path`` and a hash of its contents."""
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return commit
    digest = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:12]
    # A local checkpoint is named by its folder, never its path: the version reaches cards and the record.
    return f"{Path(str(config._name_or_path)).name}@{digest}"


def _describe(invalid: ValidationError) -> str:
    """Return where and how validation failed, without the input values (they may be clinical text)."""
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '<root>'}: {error['type']}"
        for error in invalid.errors(include_input=False)
    )
    return f"output did not validate: {problems}"


class _GrammarConstraint(LogitsProcessor):
    """Masks each row's logits to the tokens its llguidance matcher allows; one per ``generate`` call.

    Rows stop at their own ``max_new_tokens`` (forced to a stop token) while the batch runs to the largest.
    """

    def __init__(
        self,
        matchers: list[llguidance.LLMatcher],
        limits: list[int],
        eos_ids: list[int],
        start: int,
        executor: llguidance.LLExecutor,
        vocab_size: int,
    ) -> None:
        self.matchers = matchers
        self.limits = limits
        self.eos_ids = set(eos_ids)
        self.forced_eos = eos_ids[0]
        self.start = start
        self.executor = executor
        self.finished = [False] * len(matchers)
        self.errors: list[str | None] = [None] * len(matchers)
        # 32 token bits per int32 word, as llguidance writes them; pinned for fast copies to a GPU.
        self.bitmask = torch.full(
            (len(matchers), (vocab_size + 31) // 32),
            -1,
            dtype=torch.int32,
            pin_memory=torch.cuda.is_available(),
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.start
        if step > 0:
            for index, token in enumerate(input_ids[:, -1].tolist()):
                self._consume(index, token)
        # Finished rows only receive padding; leaving them unmasked keeps their logits finite.
        self.bitmask.fill_(-1)
        constrained = []
        forced = []
        for index, matcher in enumerate(self.matchers):
            if self.finished[index]:
                continue
            if step >= self.limits[index] or matcher.is_error():
                forced.append(index)
            else:
                constrained.append((matcher, index))
        if constrained:
            # llguidance.torch wraps this call, but importing it costs seconds (it imports torch._dynamo).
            row_bytes = self.bitmask.shape[1] * self.bitmask.element_size()
            self.executor.unsafe_compute_mask_ptr(
                constrained, self.bitmask.data_ptr(), row_bytes, self.bitmask.shape[0]
            )
        allowed = _unpack_bits(self.bitmask.to(scores.device))[:, : scores.shape[1]]
        scores = scores.masked_fill(~allowed, float("-inf"))
        if forced:
            scores[forced] = float("-inf")
            scores[forced, self.forced_eos] = 0.0
        return scores

    def _consume(self, index: int, token: int) -> None:
        if self.finished[index]:
            return
        if token in self.eos_ids:
            self.finished[index] = True
            return
        matcher = self.matchers[index]
        if not matcher.consume_token(token) and self.errors[index] is None:
            self.errors[index] = f"constraint failed: {matcher.get_error()}"


def _unpack_bits(bitmask: torch.Tensor) -> torch.Tensor:
    """Return the boolean token mask of an llguidance int32 bitmask (bit ``i % 32`` of word ``i // 32``)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
