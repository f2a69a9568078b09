"""Images in, text out: tiny random HF vision-language models of each supported architecture (saved by the installed
transformers with their processors) against HF transformers itself — prompt token ids, logits within 1e-4 and greedy
tokens, with chunked prefill cutting through image tokens, mixed batches, preemption, n-gram speculation and LoRA —
plus the encoder cache, prefix caching keyed by image content, the chat and server APIs, and bad input."""
import base64
import io

import numpy as np
import pytest
import torch
from conftest import assert_all_blocks_free, make_llm
from PIL import Image
from vlm_models import save_tiny_vlm

from lanner import LoRARequest, SamplingParams
from lanner.attention import AttentionMetadata

KINDS = ("llava-clip", "llava-siglip", "idefics3", "idefics2")
QUESTION = "What is in this picture? Answer in one word."
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def picture(seed: int, size=(48, 40)) -> Image.Image:
    """A smooth random picture (gradients plus noise), so resizes of it are not all alike."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), x * y], -1)
    pixels = 127 + 100 * base + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


IMAGES = [picture(1), picture(2, (33, 57)), picture(3, (70, 30))]


def hf_text(kind: str, question: str = QUESTION) -> str:
    return f"<image>{question}" if kind.startswith("idefics") else f"USER: <image>\n{question} ASSISTANT:"


@pytest.fixture(scope="module")
def tiny_vlms(tmp_path_factory):
    """kind -> (kind, its directory, the HF model, the HF processor, our LLM), each built once."""
    from transformers import AutoProcessor
    built = {}

    def get(kind):
        if kind not in built:
            path = tmp_path_factory.mktemp(kind)
            model = save_tiny_vlm(path, kind)
            built[kind] = kind, str(path), model, AutoProcessor.from_pretrained(path), make_llm(str(path))
        return built[kind]
    return get


@pytest.fixture(params=KINDS)
def vlm(request, tiny_vlms):
    return tiny_vlms(request.param)


@pytest.fixture
def llava(tiny_vlms):
    return tiny_vlms("llava-clip")


def hf_inputs(processor, text: str, image: Image.Image) -> dict:
    return processor(text=text, images=[image], return_tensors="pt")


def hf_generate(model, processor, text: str, image: Image.Image, max_new_tokens: int = 8) -> list[int]:
    inputs = hf_inputs(processor, text, image)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def our_prompt_logits(llm, prompt: dict) -> torch.Tensor:
    """Every prompt position's logits from the serving path: the image rows through the engine's own embeds."""
    engine = llm.engine
    tokenized, runner, bs = engine.tokenize(prompt), engine.runner, engine.cfg.block_size
    n = len(tokenized.token_ids)
    rows, values = runner.vision.embeds([(tokenized.images, 0, 0, n)])
    meta = AttentionMetadata.build([n], [n], [list(range(-(-n // bs)))], list(range(n)))
    with torch.no_grad():
        hidden = runner.model(torch.tensor(tokenized.token_ids), torch.arange(n), meta,
                              (torch.tensor(rows), torch.cat(values)))
        return runner.model.compute_logits(hidden)


def mm(kind: str, image, question: str = QUESTION) -> dict:
    return {"prompt": hf_text(kind, question), "multi_modal_data": {"image": image}}


def test_prompt_tokens_and_logits_match_hf(vlm):
    kind, _, model, processor, llm = vlm
    for image in IMAGES[:2]:
        inputs = hf_inputs(processor, hf_text(kind), image)
        assert llm.engine.tokenize(mm(kind, image)).token_ids == inputs["input_ids"][0].tolist()
        with torch.no_grad():
            expected = model(**inputs).logits[0]
        torch.testing.assert_close(our_prompt_logits(llm, mm(kind, image)), expected, atol=1e-4, rtol=0)


def test_greedy_matches_hf_in_a_mixed_batch_with_chunks_cutting_through_images(vlm):
    kind, path, model, processor, _ = vlm
    expected = [hf_generate(model, processor, hf_text(kind), image) for image in IMAGES]
    chunked = make_llm(path, max_num_batched_tokens=7)   # prompt chunks of a few tokens: images are cut
    outs = chunked.generate([mm(kind, image) for image in IMAGES] + ["no image here"], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:3]] == expected
    assert chunked.engine.runner.vision.num_encoded == len(IMAGES)
    assert_all_blocks_free(chunked)


def test_same_image_hits_encoder_and_prefix_cache_a_different_one_never(vlm):
    kind, path, model, processor, _ = vlm
    llm = make_llm(path, block_size=4)
    vision = llm.engine.runner.vision
    first = llm.generate(mm(kind, IMAGES[0]), GREEDY, use_tqdm=False)[0]
    again = llm.generate(mm(kind, IMAGES[0].copy()), GREEDY, use_tqdm=False)[0]   # same pixels, another object
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert vision.num_encoded == 1
    n = len(first.prompt_token_ids)
    assert again.metrics.num_cached_tokens == (n - 1) // 4 * 4
    other = llm.generate(mm(kind, IMAGES[1]), GREEDY, use_tqdm=False)[0]
    first_image_token = first.prompt_token_ids.index(vision.image_token_id)
    assert other.metrics.num_cached_tokens <= first_image_token
    assert other.outputs[0].token_ids == hf_generate(model, processor, hf_text(kind), IMAGES[1])
    assert vision.num_encoded == 2
    assert_all_blocks_free(llm)


def test_preemption_and_ngram_speculation_keep_outputs(vlm):
    kind, path, *_ = vlm
    prompts = [mm(kind, image) for image in IMAGES]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = make_llm(path)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    longest = max(len(llm.engine.tokenize(p).token_ids) for p in prompts) + params.max_tokens
    tight = make_llm(path, num_kv_blocks=-(-longest // 4) + 4, block_size=4)   # room for one request at a time
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)] == plain
    assert tight.engine.scheduler.num_preemptions > 0
    spec = make_llm(path, speculative={"method": "ngram", "num_speculative_tokens": 3})
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)] == plain
    assert_all_blocks_free(tight)
    assert_all_blocks_free(spec)


def test_lora_on_multimodal_requests_equals_peft(tiny_vlms, tmp_path):
    """One architecture is enough: the adapter only touches the text model."""
    kind, path, model, processor, _ = tiny_vlms("idefics3")
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                  target_modules=r".*text_model.*\.(q_proj|v_proj|down_proj)"))
    peft_model.save_pretrained(str(tmp_path))
    expected = hf_generate(peft_model, processor, hf_text(kind), IMAGES[0])
    peft_model.unload()
    llm = make_llm(path, enable_lora=True, max_lora_rank=8)
    lora = LoRARequest("a", 1, str(tmp_path))
    outs = llm.generate([mm(kind, IMAGES[0]), mm(kind, IMAGES[0])], GREEDY, lora_request=[lora, None], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == expected
    assert outs[1].outputs[0].token_ids != expected   # the base model answers otherwise


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_with_image_parts_equals_generate(vlm):
    kind, _, _, _, llm = vlm
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}},
                                             {"type": "text", "text": QUESTION}]}]
    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "<image>" + QUESTION}])
    plain = llm.generate({"prompt": text, "multi_modal_data": {"image": IMAGES[0]}}, GREEDY, use_tqdm=False)[0]
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids
    assert chat.prompt_token_ids == plain.prompt_token_ids


BOMB = Image.new("RGB", (9000, 9000))


@pytest.mark.parametrize("prompt,message", [
    ({"prompt": "<image>hi", "multi_modal_data": {"image": b"\x89PNG\r\n\x1a\n not really"}}, "image"),
    ({"prompt": "<image>hi", "multi_modal_data": {"image": data_url(IMAGES[0])[:-200]}}, "image"),
    ({"prompt": "<image>hi", "multi_modal_data": {"image": "data:image/png;base64,@@@"}}, "base64"),
    ({"prompt": "<image>hi", "multi_modal_data": {"image": "https://example.com/cat.png"}}, "remote"),
    ({"prompt": "<image>hi", "multi_modal_data": {"image": "file:///etc/passwd"}}, "allowed-local-media-path"),
    ({"prompt": "<image>hi", "multi_modal_data": {"image": BOMB}}, "pixels"),
    ({"prompt": "<image>" * 5 + "hi", "multi_modal_data": {"image": IMAGES[:1] * 5}}, "limit"),
    ({"prompt": "hi", "multi_modal_data": {"image": IMAGES[0]}}, "placeholder"),
    ({"prompt": "<image>hi", "multi_modal_data": {"video": IMAGES[0]}}, "video"),
    ({"prompt": "<image>" + "hi " * 600, "multi_modal_data": {"image": IMAGES[0]}}, "max_model_len"),
])
def test_bad_image_input_is_a_clear_error_and_leaks_nothing(llava, prompt, message):
    kind, _, _, _, llm = llava
    with pytest.raises(ValueError, match=message):
        llm.generate([mm(kind, IMAGES[0]), prompt], GREEDY, use_tqdm=False)
    assert_all_blocks_free(llm)
    assert llm.generate(mm(kind, IMAGES[0]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_an_image_for_a_text_only_model_is_refused(llm):
    with pytest.raises(ValueError, match="takes no images"):
        llm.generate({"prompt": "<image>hi", "multi_modal_data": {"image": IMAGES[0]}}, use_tqdm=False)
    assert_all_blocks_free(llm)


def test_openai_client_sends_images_to_the_server_and_gets_llm_chat_text(llava, tmp_path):
    import httpx
    import openai

    from lanner.server.app import ServerSettings, build_app
    from lanner.server.async_engine import AsyncEngine
    from lanner.server.cli import make_registry
    from lanner.server.runner import BackgroundServer
    kind, path, _, _, llm = llava
    allowed = tmp_path / "media"
    allowed.mkdir()
    IMAGES[0].save(allowed / "picture.png")
    engine = make_llm(path, allowed_local_media_path=str(allowed)).engine
    async_engine = AsyncEngine(engine)
    server = BackgroundServer(build_app(async_engine, make_registry("vlm", engine, []), ServerSettings()),
                              async_engine).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert client.models.list().data[0].input_modalities == ["text", "image"]

        def ask(url):
            return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": QUESTION}]}]
        expected = llm.chat(ask(data_url(IMAGES[0])), GREEDY, use_tqdm=False)[0].outputs[0].text
        for url in (data_url(IMAGES[0]), (allowed / "picture.png").as_uri()):
            reply = client.chat.completions.create(model="vlm", messages=ask(url), max_tokens=8, temperature=0,
                                                   extra_body={"ignore_eos": True})
            assert reply.choices[0].message.content == expected
        for url, message in [("https://example.com/cat.png", "remote"), ((tmp_path / "x.png").as_uri(), "allowed"),
                             ("data:image/png;base64,AAAA", "image"), ("/etc/passwd", "data: URLs")]:
            r = httpx.post(server.url + "/v1/chat/completions", json={"model": "vlm", "messages": ask(url)})
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    finally:
        server.stop()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_cli_generate_with_an_image(llava, tmp_path, capsys):
    from lanner.cli import main
    kind, path, _, _, llm = llava
    IMAGES[0].save(tmp_path / "picture.png")
    assert main(["generate", "--model", path, "--dtype", "float32", "--image", str(tmp_path / "picture.png"),
                 "--max-tokens", "8", QUESTION]) == 0
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": QUESTION}]}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    assert capsys.readouterr().out.strip() == expected.strip()


def test_cli_chat_attaches_an_image_with_the_image_command(llava, tmp_path, capsys, monkeypatch):
    from lanner.cli import main
    kind, path, _, _, llm = llava
    IMAGES[1].save(tmp_path / "picture.png")
    lines = iter([f"/image {tmp_path / 'missing.png'}", f"/image {tmp_path / 'picture.png'}", QUESTION, "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", path, "--dtype", "float32", "--max-tokens", "8"]) == 0
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGES[1]}, {"type": "text", "text": QUESTION}]}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    out = capsys.readouterr()
    assert out.out.strip() == expected.strip()
    assert "cannot read image file" in out.err


PARTS_TEMPLATE = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
                  "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
                  "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
                  "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                  "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def test_a_template_that_reads_content_parts_gets_them_as_hf_processors_do(tiny_vlms, tmp_path):
    """VLM chat templates (SmolVLM's, LLaVA's) iterate typed content parts: the prompt equals what the HF
    processor's apply_chat_template + processor make of the same messages; a plain string turns into a text part."""
    import shutil
    kind, path, _, processor, _ = tiny_vlms("idefics3")
    shutil.copytree(path, tmp_path / "vlm")
    (tmp_path / "vlm" / "chat_template.jinja").write_text(PARTS_TEMPLATE)
    llm = make_llm(str(tmp_path / "vlm"))
    ours = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}},
                                         {"type": "text", "text": QUESTION}]}]
    hf_messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                   {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(hf_messages, chat_template=PARTS_TEMPLATE, add_generation_prompt=True)
    expected = processor(text=text, images=[IMAGES[0]], return_tensors="pt")["input_ids"][0].tolist()
    assert llm.chat(ours, GREEDY, use_tqdm=False)[0].prompt_token_ids == expected
