"""The tiny preset tokenizes prompts as the real Qwen2.5-VL checkpoints do, so validation agrees with them.

Known real-Qwen ids: transformers' own integration test of `Qwen/Qwen-tokenizer` (the tokenizer Qwen2 and
Qwen2.5 keep unchanged), for an English and a Chinese text; Russian against tiktoken, an independent BPE
implementation, over the same ranks and Qwen's pre-tokenizer pattern.
"""

import numpy as np
import pytest

from pipelines import Renderer, load_spec
from tests.helpers import build_tasks, oracle
from tests.test_validation import _table

ENGLISH = ("Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
           "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
           "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
           "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.")
ENGLISH_IDS = [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8,
               5707, 4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11,
               27604, 321, 33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448,
               11434, 23470, 320, 30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10,
               15459, 323, 5538, 94130, 2897, 1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13]
CHINESE = ("🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，"
           "并且节省从头训练所需要的时间和资源。")
CHINESE_IDS = [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034,
               104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997,
               33108, 100912, 105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773]
RUSSIAN = "Кошка танцует под дождём на узкой улице старого города, вечерний свет отражается в лужах."
# 25 short English sentences (1,578 characters): ~330 real Qwen tokens, well inside the pipeline's 512.
SENTENCES = [
    "A small red fox walks slowly through a quiet winter forest at dawn.",
    "Soft snow falls from the heavy branches of tall dark pine trees.",
    "The fox stops beside a frozen stream and listens carefully for mice.",
    "Pale golden light rises behind the distant snowy mountains.",
    "A gentle wind lifts fine powder from the top of a white hill.",
    "The camera follows the fox at a low angle, close to the ground.",
    "Tiny ice crystals sparkle in the air like floating silver dust.",
    "A curious owl watches from a hollow in an old birch tree.",
    "The fox jumps high and dives headfirst into a deep snowdrift.",
    "It emerges a moment later with snow covering its narrow face.",
    "Long blue shadows stretch across the clearing as the sun climbs.",
    "A herd of deer crosses the far edge of the frozen meadow.",
    "Their breath forms small clouds of steam in the cold morning air.",
    "The fox trots past a wooden fence half buried in the snow.",
    "Icicles hang from the roof of an abandoned hunting cabin nearby.",
    "A thin line of smoke rises from a chimney far down the valley.",
    "The sky turns from deep violet to a clear and brilliant blue.",
    "Birds begin to sing as the forest slowly wakes up around them.",
    "The fox pauses on a rock and looks back toward the rising sun.",
    "Its thick orange fur glows warmly against the cold white world.",
    "A squirrel races along a branch and shakes loose a shower of snow.",
    "The fox follows a winding path of tracks toward the river.",
    "Water still runs beneath a thin sheet of clear transparent ice.",
    "The scene is calm, cinematic and filmed in smooth slow motion.",
    "Finally the fox curls up in a sunny hollow and closes its eyes.",
]


@pytest.fixture(scope="module")
def spec(model_cache):
    return load_spec("tiny")


def test_known_real_qwen_ids(spec):
    qwen = spec.processor().tokenizer
    assert qwen(ENGLISH)["input_ids"] == ENGLISH_IDS
    assert qwen(CHINESE)["input_ids"] == CHINESE_IDS
    assert len(qwen) == 151665 and qwen.convert_tokens_to_ids(["<|im_start|>", "<|video_pad|>"]) == [151644, 151656]


def test_russian_matches_an_independent_bpe_over_the_same_ranks(spec):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from pipelines.tiny import qwen_bpe_ranks

    reference = tiktoken.Encoding("qwen", pat_str=PRETOKENIZE_REGEX,
                                  mergeable_ranks=load_tiktoken_bpe(qwen_bpe_ranks()), special_tokens={})
    for text in (RUSSIAN, RUSSIAN.upper(), " ".join(SENTENCES)):
        assert spec.processor().tokenizer(text)["input_ids"] == reference.encode(text), text[:40]


def test_a_25_sentence_prompt_renders_and_a_60_sentence_one_is_invalid(spec, tiny_pipe):
    from kandinsky_batch.config.load import load_config
    from tests.helpers import TINY_RENDER

    story = " ".join(SENTENCES)
    assert 1500 < len(story) < 1800 and 300 < spec.prompt_tokens(story) < 450
    novel = " ".join((SENTENCES * 3)[:60])
    cfg = load_config(None, ["input.path=unused.parquet", "output.uri=unused", *TINY_RENDER])
    tasks, invalid = build_tasks(_table([{"id": "story", "prompt": story}, {"id": "novel", "prompt": novel}]), cfg, spec)
    assert [t.id for t in tasks] == ["story"]
    assert [r["id"] for r in invalid] == ["novel"] and invalid[0]["error"].startswith("prompt=")
    assert f"at most {spec.max_prompt_tokens}" in invalid[0]["error"]
    request = tasks[0].request()
    assert np.array_equal(Renderer("tiny").render(request), oracle(tiny_pipe, request.__dict__))


TRICKY = [
    "a cat", "A", "'s a contraction first", "'S shouting", "123 numbers first 4567", "  padded  ", "\ttabbed\n",
    "line one\nline two\n\nline four", "!!! punctuation ???", "…ellipsis first", "emoji 🤗 in the middle 🐈‍⬛",
    "中文提示词：一只猫在雨中跳舞。", "Кошка под дождём", "mixed 中文 and English, 42 times!", "&amp; html &lt;tag&gt;",
    "ends with a newline\n", "\u00a0non-breaking start", "zero\u200bwidth", "x" * 600, "word " * 400,
    "\u3000ideographic space start", "'", "-dash start", "https://example.com/a?b=c", "tab\tinside", "   ",
    ENGLISH, CHINESE, RUSSIAN, " ".join(SENTENCES),
]


def test_batch_token_counts_equal_the_pipeline_way(spec):
    """`count_tokens` (one Rust batch call over the cleaned prompts) = `prompt_tokens` (the templated text
    through the processor, as diffusers does) for every prompt, including at and beyond the limit."""
    at_limit = "word " * (spec.max_prompt_tokens - 1)
    prompts = TRICKY + [at_limit, at_limit + "word", at_limit + "word word"]
    assert spec.count_tokens(prompts) == [spec.prompt_tokens(p) for p in prompts]


def test_the_driver_cleans_prompts_as_diffusers_does():
    from diffusers.pipelines.kandinsky5.pipeline_kandinsky import prompt_clean

    from pipelines.tokens import clean_prompt

    for text in TRICKY + ["&amp;amp; twice escaped", "a\u2028b\u2029c", "\x85next line", "  \r\n  "]:
        assert clean_prompt(text) == prompt_clean(text), repr(text)


def test_saved_tokenizers_list_their_added_tokens_and_load_as_without_them(tmp_path, model_cache):
    """Each tokenizer of a saved preset keeps its added tokens in `tokenizer_config.json` (the hub checkpoints' form,
    which spares transformers a second parse of `tokenizer.json` at every load), and loads exactly as the same files
    without that field do: same added and special tokens, same ids for every text, specials included."""
    import json
    import shutil
    from pathlib import Path

    from transformers import AutoProcessor, AutoTokenizer

    from pipelines import resolve_model

    texts = [*TRICKY, "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a cat<|im_end|><|endoftext|>",
             "<|startoftext|>a cat<|endoftext|>"]
    preset = Path(resolve_model("tiny"))
    for folder, load in (("tokenizer", lambda p: AutoProcessor.from_pretrained(p).tokenizer),
                         ("tokenizer_2", AutoTokenizer.from_pretrained)):
        config = json.loads((preset / folder / "tokenizer_config.json").read_text())
        saved = load(str(preset / folder))
        assert {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()} == \
               {i: str(t) for i, t in saved.added_tokens_decoder.items()} != {}
        bare = tmp_path / folder
        shutil.copytree(preset / folder, bare)
        del config["added_tokens_decoder"]
        (bare / "tokenizer_config.json").write_text(json.dumps(config))
        without = load(str(bare))
        assert saved.added_tokens_decoder == without.added_tokens_decoder, folder
        assert saved.all_special_tokens == without.all_special_tokens and len(saved) == len(without), folder
        assert saved(texts)["input_ids"] == without(texts)["input_ids"], folder
