"""The shipped model: a Stable Diffusion folder like any other, small, and loaded by the one loader."""
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from sc_app.api import generate
from sc_app.models import EMBEDDED, load_model
from sc_app.plan import plan_stages

MAX_WEIGHT_BYTES = 25 * 1024 * 1024


def test_embedded_is_a_small_sd_folder_of_safetensors():
    weights = list(EMBEDDED.rglob("*.safetensors"))
    assert len(weights) == 3  # unet, vae, text encoder
    assert not [p for p in EMBEDDED.rglob("*") if p.suffix in {".bin", ".pt", ".ckpt", ".pkl"}]
    assert sum(p.stat().st_size for p in weights) <= MAX_WEIGHT_BYTES
    assert (EMBEDDED / "model_index.json").is_file()


def test_embedded_loads_like_any_sd_folder_and_generates_the_right_sizes():
    model = load_model("embedded", device="cpu")
    pipe = model.pipe
    assert isinstance(pipe, StableDiffusionPipeline) and not model.is_xl
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert model.base_size == 64 and model.name == "embedded"
    assert 0 < model.default_k < 1000 and model.default_guidance > 1
    result = generate(model, "a red circle and a blue square", 128, 256, num_inference_steps=3, seed=0)
    assert [(s.height, s.width) for s in result.stages] == plan_stages(128, 256, 64, model.size_multiple)
    assert len(result.stages) == 3 and result.stages[0].height * result.stages[0].width <= 64 * 64 * 1.2
    assert result.images[0].size == (256, 128)
    assert pipe.tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
