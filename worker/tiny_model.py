"""A tiny random-weight Gemma3 checkpoint laid out like google/medgemma-4b-it, for tests and benches.

The folder it writes loads through the same ``AutoProcessor`` / ``AutoModelForImageTextToText`` lines as the
real model: a Gemma-layout BPE tokenizer (byte fallback, ``▁`` for space, Gemma's special tokens and chat
template), a ``Gemma3Processor`` with the real image processor settings (896 x 896, SigLIP patches of 14,
pooled to 256 image tokens), a ``Gemma3ForConditionalGeneration`` with a SigLIP vision tower of that shape
(narrow and one layer deep), and the sampling ``generation_config.json`` the real checkpoint ships. Only the
widths and depths are small. Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import Gemma3Config
from transformers import Gemma3ForCausalLM
from transformers import Gemma3ForConditionalGeneration
from transformers import Gemma3Processor
from transformers import Gemma3TextConfig
from transformers import GemmaTokenizer
from transformers import GenerationConfig
from transformers import SiglipVisionConfig
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

# Gemma 3's chat template: there is no system role, so a system message is folded into the first user turn;
# images are content items rendered as <start_of_image>, which the processor expands to the soft tokens.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# Gemma's first ids (pad 0, eos 1, bos 2, unk 3, mask 4), then the turn and image markers it adds as tokens.
_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
_MARKERS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]
# Gemma puts the image soft token after every other id (262,144); the tiny tokenizer keeps that layout.
_IMAGE_TOKEN = "<image_soft_token>"
_BPE_VOCAB_SIZE = 1024
_BENCH_BPE_VOCAB_SIZE = 16_384
_SAMPLE_CHARTS = Path(__file__).resolve().parents[1] / "cds_service" / "data" / "sample"
_MODEL_VOCAB_MULTIPLE = 64
# google/medgemma-4b-it's preprocessor_config.json and config.json: 896 x 896 pixels, 14-pixel patches
# (64 x 64 of them), average-pooled 4 x 4 to 256 soft tokens per image.
IMAGE_SIZE = 896
PATCH_SIZE = 14
IMAGE_TOKENS = 256
#: How the model's vocabulary (embedding rows) relates to the tokenizer's length:
#: ``padded``: rounded up past the tokenizer to a multiple of 64, as google/medgemma-4b-it (262,208 rows for
#: a 262,145-entry tokenizer); ``one-short``: one row fewer than the tokenizer has entries (the image soft
#: token, last, has no row), as Gemma 3 text checkpoints whose config says 262,144.
VocabLayout = Literal["padded", "one-short"]

# A few hundred words of clinical English and JSON, enough for BPE merges that make prompts and
# structured answers a few characters per token instead of one.
_CORPUS = """
The user asks the model for a summary; the model answers the user in JSON only.
The patient is a 67 year old woman with type 2 diabetes mellitus, hypertension and chronic kidney disease
stage 3. She presents for follow-up of her blood pressure and glucose control. Current medications include
metformin 1000 mg twice daily, lisinopril 20 mg daily, atorvastatin 40 mg at night and aspirin 81 mg daily.
Her most recent hemoglobin A1c was 8.2 percent and the estimated glomerular filtration rate was 42.
Potassium is 5.3 mmol/L. She reports no chest pain, shortness of breath or swelling of the legs.
Assessment: diabetes not at goal; consider adding an SGLT2 inhibitor given kidney disease. Review the
metformin dose for the reduced kidney function. Recheck potassium and creatinine in two weeks.
Chest X-ray, frontal view: the lungs are clear. No focal consolidation, pleural effusion or pneumothorax.
The cardiac silhouette is normal in size. The mediastinum is not widened. Mild degenerative changes of
the thoracic spine. Impression: no acute cardiopulmonary abnormality. Findings are routine.
Right lower lobe opacity concerning for pneumonia in the appropriate clinical setting; follow-up
radiograph after treatment is recommended. Small left pleural effusion. Urgent review is advised.
Draft orders: warfarin 5 mg daily together with ibuprofen 400 mg three times daily increases the risk
of bleeding; change to paracetamol. Potassium chloride with lisinopril and high potassium: remove.
Allergy to penicillin: amoxicillin order should be changed. Keep the order for a complete blood count.
{"summary": "Patient with diabetes and hypertension.", "key_problems": ["diabetes", "hypertension"],
"medication_concerns": ["metformin dose"], "follow_up": ["recheck potassium"],
"evidence_ids": ["Patient/example", "Condition/c1", "Observation/obs-2", "MedicationRequest/m3"]}
{"findings": "Lungs are clear.", "impression": "Normal chest radiograph.", "urgency": "routine"}
{"concerns": [{"order_id": "MedicationRequest/draft-1", "severity": "warning", "issue": "Interaction.",
"recommendation": "Change the order.", "action": "change"}], "urgency": "critical", "severity": "info"}
"""


def build_tiny_model(
    directory: Path, seed: int = 0, *, text_only: bool = False, vocab: VocabLayout = "padded"
) -> Path:
    """Return ``directory`` after writing a seeded random-weight Gemma3 checkpoint into it.

    By default an image-text checkpoint shaped like google/medgemma-4b-it; with ``text_only`` a
    ``Gemma3ForCausalLM`` with a bare tokenizer, shaped like google/medgemma-27b-text-it. ``vocab`` picks the
    vocabulary layout (``VocabLayout``); ``one-short`` needs ``text_only`` (an image-text model must embed
    its image token). The same seed gives the same weights; the tokenizer does not depend on the seed.
    """
    if vocab == "one-short" and not text_only:
        raise ValueError("the one-short vocabulary layout is for text-only checkpoints")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = gemma_tokenizer()
    vocab_size = (
        len(tokenizer) - 1
        if vocab == "one-short"
        # Gemma pads the embedding past the tokenizer (262,145 -> 262,208): logits have ids no token has.
        else -(-(len(tokenizer) + 1) // _MODEL_VOCAB_MULTIPLE) * _MODEL_VOCAB_MULTIPLE
    )
    text_config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=8192,
        sliding_window=256,
        layer_types=["sliding_attention", "full_attention"],
        # Larger than Gemma's 0.02 so random logits lie far apart: greedy choices then do not flip on float
        # rounding between batched and unbatched runs.
        initializer_range=0.25,
    )
    torch.manual_seed(seed)
    if text_only:
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
        tokenizer.save_pretrained(directory)
        model: Gemma3ForCausalLM | Gemma3ForConditionalGeneration = Gemma3ForCausalLM(text_config)
    else:
        gemma3_processor(tokenizer).save_pretrained(directory)
        vision_config = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            vision_use_head=False,
        )
        config = Gemma3Config(
            text_config=text_config,
            vision_config=vision_config,
            mm_tokens_per_image=IMAGE_TOKENS,
            boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
            image_token_index=tokenizer.convert_tokens_to_ids(_IMAGE_TOKEN),
            initializer_range=text_config.initializer_range,
        )
        model = Gemma3ForConditionalGeneration(config)
        # transformers starts the image projection at zero (as for fine-tuning), which would make every image
        # look alike to the model; random values let tests see that images change the answer.
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.25)
    model.generation_config = medgemma_generation_config(tokenizer)
    model.save_pretrained(directory)
    return directory


def gemma3_processor(tokenizer: GemmaTokenizer) -> Gemma3Processor:
    """Return a Gemma3Processor with google/medgemma-4b-it's image settings around ``tokenizer``."""
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=2,
        do_pan_and_scan=None,
        do_convert_rgb=None,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=IMAGE_TOKENS,
    )


def medgemma_generation_config(tokenizer: GemmaTokenizer) -> GenerationConfig:
    """Return the generation config the MedGemma checkpoints ship: stop on <eos> or <end_of_turn>, and
    sampling defaults the runtime has to override."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
        do_sample=True,
        top_k=64,
        top_p=0.95,
    )


def gemma_tokenizer(size: int | None = None) -> GemmaTokenizer:
    """Return a GemmaTokenizer over a BPE vocabulary trained on ``_CORPUS``, with Gemma's ids and specials.

    ``size`` (e.g. Gemma's 262,145) pads the vocabulary with seeded synthetic pieces, so what depends on the
    vocabulary's size (the constraint's token masks, the output layer) costs what it does with the real
    one; the image token stays last.
    """
    trainer_tokenizer = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    printable = [c.replace(" ", "▁") for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    corpus = _CORPUS.strip().splitlines()
    if size is not None:
        # A Gemma-sized vocabulary is for measuring: merges learnt from the sample charts' text make record
        # text about as many tokens as Gemma's tokenizer makes it (~4 characters a token).
        corpus += _sample_chart_text()
    merges_budget = _BPE_VOCAB_SIZE if size is None else _BENCH_BPE_VOCAB_SIZE
    trainer = BpeTrainer(vocab_size=merges_budget, initial_alphabet=printable + ["\n"], show_progress=False)
    trainer_tokenizer.train_from_iterator(corpus, trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab: dict[str, int] = {}
    for token in [
        *_GEMMA_SPECIALS,
        *_MARKERS,
        *byte_tokens,
        *sorted(trained["vocab"], key=trained["vocab"].get),
    ]:
        vocab.setdefault(token, len(vocab))
    pieces = random.Random(0)
    while size is not None and len(vocab) < size - 1:
        piece = "".join(pieces.choices(string.ascii_lowercase, k=pieces.randint(2, 10)))
        vocab.setdefault(("▁" if pieces.random() < 0.5 else "") + piece, len(vocab))
    vocab[_IMAGE_TOKEN] = len(vocab)
    merges = [tuple(pair) for pair in trained["merges"]]

    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        # As Gemma's: plain encoding starts with <bos>; chat templates write it themselves.
        add_bos_token=True,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": _IMAGE_TOKEN,
        },
    )
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (*_MARKERS, _IMAGE_TOKEN)],
        special_tokens=True,
    )
    return tokenizer


def _sample_chart_text() -> list[str]:
    """Return every string value of the shipped sample charts (Synthea FHIR Bundles)."""

    def strings(value: object) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [text for item in value.values() for text in strings(item)]
        if isinstance(value, list):
            return [text for item in value for text in strings(item)]
        return []

    return [
        text
        for path in sorted(_SAMPLE_CHARTS.glob("*.json"))
        for text in strings(json.loads(path.read_text()))
    ]
