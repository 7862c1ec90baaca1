"""Tiny transformers checkpoints built from configs (hidden size 32, one layer), saved with
`save_pretrained` plus an offline processor / tokenizer, for the backend tests and
`scripts/gpu_check.sh`. No download and no pytest: the GPU check machine has neither.

Each builder writes a checkpoint directory and returns its path; the tiers then load it through
their production `from_pretrained(path)` path exactly as they would a hub checkpoint.
"""

from __future__ import annotations

WORDS = ("a photo of the dashcam street view image blurry at night road construction work orange "
         "traffic cones on barriers blocking lane ahead sign workers repairing an excavator "
         "temporary empty normal with highway cars city parked country residential car lights "
         "parking lot look this is there or zone visible next to for example signs excavators "
         "answer one word yes no Yes No YES NO user assistant system").split()
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(max_length: int, *, chat: bool = False):
    """A word-level fast tokenizer over the prompt vocabulary (no download, no sentencepiece)."""
    import tokenizers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<image>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + list(WORDS) + list(".,?:()\n{}")))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=tokenizers.Regex(r"\w+|[^\w\s]|\n"),
                                            behavior="isolated")
    tk.add_special_tokens(specials)
    if not chat:  # CLIP pools at the end-of-text token, so text gets <s> ... </s>
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="<|im_end|>" if chat else "</s>",
                                  model_max_length=max_length)
    return tok, vocab


def _save(model, processor, path):
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def build_classifier(path):
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64,
                    id2label={0: "no_roadwork", 1: "Roadwork"}, label2id={"no_roadwork": 0, "Roadwork": 1})
    return _save(ViTForImageClassification(cfg).eval(),
                 ViTImageProcessorPil(size={"height": 32, "width": 32}), path)


def build_dinov2(path):
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    cfg = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, mlp_ratio=2)
    proc = BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return _save(Dinov2Model(cfg).eval(), proc, path)


def build_clip(path):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok, vocab = tiny_tokenizer(32)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=0,
                         bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"]),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)
    proc = CLIPProcessor(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tok)
    return _save(CLIPModel(cfg).eval(), proc, path)


def build_siglip(path):
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok, vocab = tiny_tokenizer(64)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], projection_size=32),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2))
    proc = SiglipProcessor(image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                           tokenizer=tok)
    return _save(SiglipModel(cfg).eval(), proc, path)


def build_rtdetr(path):
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig
    from transformers.models.rt_detr.image_processing_pil_rt_detr import RTDetrImageProcessorPil

    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                  layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    labels = {0: "car", 1: "Traffic cone", 2: "person"}
    cfg = RTDetrConfig(backbone_config=backbone, encoder_in_channels=[16, 32, 64], encoder_hidden_dim=32,
                       encoder_ffn_dim=64, encoder_layers=1, encoder_attention_heads=2, d_model=32,
                       decoder_in_channels=[32, 32, 32], decoder_layers=1, decoder_ffn_dim=64,
                       decoder_attention_heads=2, decoder_n_points=2, num_queries=10, num_denoising=0,
                       num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()},
                       anchor_image_size=None, use_pretrained_backbone=False)
    return _save(RTDetrForObjectDetection(cfg).eval(),
                 RTDetrImageProcessorPil(size={"height": 64, "width": 64}), path)


def build_dfine(path):
    from transformers import DFineConfig, DFineForObjectDetection, HGNetV2Config
    from transformers.models.rt_detr.image_processing_pil_rt_detr import RTDetrImageProcessorPil

    backbone = HGNetV2Config(embedding_size=8, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                             stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 32, 64],
                             stage_mid_channels=[8, 16, 32, 64], stage_out_channels=[16, 32, 64, 128],
                             stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1],
                             out_features=["stage2", "stage3", "stage4"])
    labels = {0: "Person", 1: "Traffic cone", 2: "Machinery Vehicle"}
    cfg = DFineConfig(backbone_config=backbone, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32,
                      encoder_ffn_dim=64, encoder_attention_heads=2, d_model=32,
                      decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64, decoder_layers=2,
                      decoder_attention_heads=2, decoder_n_points=2, num_queries=10, num_denoising=0,
                      num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()},
                      lqe_hidden_dim=8, hidden_expansion=0.5, depth_mult=0.34,
                      use_pretrained_backbone=False)
    return _save(DFineForObjectDetection(cfg).eval(),
                 RTDetrImageProcessorPil(size={"height": 64, "width": 64}), path)


def build_llava_vlm(path):
    """A LLaVA-layout VLM (CLIP vision tower + projector + Qwen2 LM) with a chat template: the
    generic vision-tower-plus-LLM family, whose processor loads without torchvision. Qwen2-VL
    has its own test below (its processor needs a torchvision-free workaround here)."""
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, Qwen2Config)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok, vocab = tiny_tokenizer(512, chat=True)
    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}), tokenizer=tok,
        patch_size=14, vision_feature_select_strategy="default", chat_template=TEMPLATE,
        num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=512, pad_token_id=0),
        image_token_id=vocab["<image>"], vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    return _save(LlavaForConditionalGeneration(cfg).eval(), proc, path)


BUILDERS = {"classifier": build_classifier, "dinov2": build_dinov2, "clip": build_clip,
            "siglip": build_siglip, "rtdetr": build_rtdetr, "dfine": build_dfine, "vlm": build_llava_vlm}
