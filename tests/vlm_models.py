"""Tiny vision-language models for the tests: the default model's tokenizer with the image tokens the HF
processors expect, and random HF models of each supported VLM architecture saved by the installed transformers."""
import functools
import os

IMAGE_TOKENS = (["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
                + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])


@functools.cache
def vlm_tokenizer():
    """The default model's HF tokenizer (from its GGUF) plus IMAGE_TOKENS as special tokens."""
    from transformers import AutoTokenizer

    from lanner.model.loader import pull_default_model
    gguf = pull_default_model()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
    return tokenizer


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512, initializer_range=0.2)
WEIGHT_NOISE = 0.2   # added to every parameter (norms, biases, latents too): sharp attention, non-degenerate rows


def save_tiny_vlm(path, kind: str, seed=0):
    """A random HF VLM of `kind` ("llava-clip", "llava-siglip", "idefics3", "idefics2") built by the installed
    transformers and saved as a complete checkpoint directory (config, weights, processor, tokenizer);
    returns the HF model in fp32 eval mode."""
    import copy

    import torch
    import transformers

    tokenizer = copy.deepcopy(vlm_tokenizer())   # the HF processors add special tokens to the one they get
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(TEXT, vocab_size=len(tokenizer))
    config, processor = _TINY_VLMS[kind](transformers, tokenizer, text, image_token_id)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * WEIGHT_NOISE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def _llava_clip(tf, tokenizer, text, image_token_id):
    vision = dict(VISION, model_type="clip_vision_model", projection_dim=32, hidden_act="quick_gelu")
    config = tf.LlavaConfig(vision_config=vision, text_config=dict(text, model_type="llama"),
                            image_token_index=image_token_id, image_seq_length=16, vision_feature_layer=-2,
                            vision_feature_select_strategy="default", architectures=["LlavaForConditionalGeneration"])
    image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = tf.LlavaProcessor(image_processor, tokenizer, patch_size=8, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1)   # the CLS row the "default" strategy drops
    return config, processor


def _llava_siglip(tf, tokenizer, text, image_token_id):
    vision = dict(VISION, model_type="siglip_vision_model")
    config = tf.LlavaConfig(vision_config=vision, text_config=dict(text, model_type="llama"),
                            image_token_index=image_token_id, image_seq_length=16, vision_feature_layer=[-3, -1],
                            vision_feature_select_strategy="full", multimodal_projector_bias=False,
                            projector_hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                            architectures=["LlavaForConditionalGeneration"])
    image_processor = tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    processor = tf.LlavaProcessor(image_processor, tokenizer, patch_size=8, vision_feature_select_strategy="full")
    return config, processor


def _idefics3(tf, tokenizer, text, image_token_id):
    config = tf.Idefics3Config(vision_config=VISION, text_config=dict(text, model_type="llama"),
                               image_token_id=image_token_id, scale_factor=2,
                               architectures=["Idefics3ForConditionalGeneration"])
    image_processor = tf.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = tf.Idefics3Processor(image_processor, tokenizer, image_seq_len=4)   # (32/8)^2 patches / 2^2
    return config, processor


def _idefics2(tf, tokenizer, text, image_token_id):
    perceiver = dict(hidden_size=text["hidden_size"], resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4,
                     resampler_head_dim=16, num_key_value_heads=2, rms_norm_eps=1e-5)
    config = tf.Idefics2Config(vision_config=VISION, perceiver_config=perceiver,
                               text_config=dict(text, model_type="mistral", sliding_window=None),
                               image_token_id=image_token_id, architectures=["Idefics2ForConditionalGeneration"])
    image_processor = tf.Idefics2ImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 40},
                                                   do_image_splitting=True)
    processor = tf.Idefics2Processor(image_processor, tokenizer, image_seq_len=4)
    return config, processor


_TINY_VLMS = {"llava-clip": _llava_clip, "llava-siglip": _llava_siglip, "idefics3": _idefics3, "idefics2": _idefics2}
