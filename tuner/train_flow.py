"""Train the embedded flow-matching model: an SD3-layout MMDiT on the shapes world, exported as a
`StableDiffusion3Pipeline` folder (assets/shapes-flow) that plain diffusers loads and samples.

    python -m tuner.train_flow --work runs/flow --out assets/shapes-flow      # resumes from --work's checkpoint
    accelerate launch -m tuner.train_flow --work runs/flow --batch-size 512   # a GPU
    python -m tuner.train_flow --work runs/flow --export-only                  # --out from the latest checkpoint

Only the transformer trains. The VAE, tokenizer and CLIP text encoder are the embedded image model's
(--base-model), frozen: the latents are the ones that model was trained on, and the text encoder was trained
with it to tell these prompts apart. SD3 asks for two CLIP encoders with a projection (pooled embeddings), so
both are that CLIP with an identity projection, the second a copy of the first; there is no T5 (the pipeline
allows text_encoder_3=None and feeds zeros in its place).

Rectified flow as SD3 trains it: x_sigma = (1 - sigma) x0 + sigma eps, the transformer predicts eps - x0 at
timestep 1000 sigma, sigma from a logit-normal(0, 1), plain MSE; caption dropout (for classifier-free
guidance), EMA, warm-up then cosine learning rate. Runs under `accelerate`, resumes from the checkpoint in
--work (one safetensors file, written atomically; tuner.checkpoints), and is reproducible from --seed: the
batch, noise and sigmas of step s come from (seed, s) alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tuner.flags import parse_config

log = logging.getLogger("train_flow")


@dataclass
class Config:
    out: str = "assets/shapes-flow"
    work: str = "runs/flow"  # the checkpoint and the latent cache
    base_model: str = "assets/shapes-ldm"  # its VAE, tokenizer and text encoder are reused, frozen
    seed: int = 0
    base_size: int = 64  # pixels; the VAE downsamples 4x and the transformer patches 2x2: 8x8 = 64 tokens
    cache_scenes: int = 60_000  # rendered and encoded once (tuner.train_base.latent_cache), then indexed
    # the transformer: SD3's MMDiT at a width of heads x head_dim (4 x 40 = 160), about 4M parameters
    layers: int = 4
    heads: int = 4
    head_dim: int = 40
    steps: int = 30_000
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 500
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    log_every: int = 50
    # an exported folder (e.g. assets/shapes-flow) whose transformer a new --work starts from, with a fresh
    # optimizer, EMA and schedule: how training goes on in a later session, where only the export was kept
    init: str = ""


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    """The flags (one per Config field) and --export-only, checked (`tuner.flags`)."""

    def check(cfg: Config) -> None:
        if cfg.base_size % (VAE_FACTOR * PATCH) or cfg.base_size > MAX_SIDE:
            raise ValueError(f"--base-size must be a multiple of {VAE_FACTOR * PATCH} up to {MAX_SIDE}")
        if not (Path(cfg.base_model) / "vae").is_dir():
            raise ValueError(f"--base-model {cfg.base_model}: not the embedded model's folder (no vae/)")
        if cfg.init:
            check_init_folder(cfg)

    positive = ("steps", "batch_size", "layers", "heads", "head_dim", "checkpoint_every", "log_every")
    return parse_config(
        Config, __doc__, argv, export_help="write --out from the checkpoint in --work", positive=positive, check=check
    )


def check_init_folder(cfg: Config) -> None:
    """--init names a folder this trainer exported with the configuration of these flags (its transformer's
    config.json against --layers, --heads, --head-dim, --base-size): read before torch loads or the cache."""
    folder = Path(cfg.init)
    config_path = folder / "transformer" / "config.json"
    if not config_path.is_file() or not (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
        raise ValueError(f"--init {folder}: not a folder this trainer exported (no transformer/ weights and config)")
    config = json.loads(config_path.read_text())
    wanted = {
        "num_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "attention_head_dim": cfg.head_dim,
        "sample_size": cfg.base_size // VAE_FACTOR,
    }
    off = [f"{k} {config.get(k)} there, {v} here" for k, v in wanted.items() if config.get(k) != v]
    if off:
        raise ValueError(
            f"--init {folder}: its transformer does not fit this configuration ({'; '.join(off)}): give the "
            "--layers, --heads, --head-dim and --base-size it was trained with (its training.json)"
        )


VAE_FACTOR = 4  # the embedded VAE's downsampling
PATCH = 2  # latent cells per token side
MAX_SIDE = 512  # the largest side in pixels: 128 latent cells, 64 patches, the positional table's side
T5_TOKENS = 256  # the zero tokens SD3's pipeline (and sc_app.families) appends when there is no T5

if __name__ == "__main__":  # the flags first: --help and bad flags answer before torch loads
    parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from sc_app.files import save_model_folder  # noqa: E402
from tuner.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from tuner.train_base import EMA, latent_cache, lr_lambda  # noqa: E402

CHECKPOINT = "flow.safetensors"
KEPT_ON_EXPORT = ("README.md", "self_cascade.json")  # edited by hand after measuring the model; a re-export keeps them


# ---- the pipeline's parts -------------------------------------------------------------------------------


def transformer_model(cfg: Config, text_width: int) -> SD3Transformer2DModel:
    """SD3's MMDiT for 4-channel latents of base_size / 4. `text_width`: one CLIP's width; the pipeline
    concatenates the two encoders' hidden states (2 x text_width channels, so joint_attention_dim needs no
    padding) and their pooled vectors (pooled_projection_dim 2 x text_width)."""
    width = cfg.heads * cfg.head_dim
    return SD3Transformer2DModel(
        sample_size=cfg.base_size // VAE_FACTOR,  # also the pipeline's default size: base_size pixels
        patch_size=PATCH,
        in_channels=4,
        out_channels=4,
        num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=2 * text_width,
        caption_projection_dim=width,  # the text stream joins the image stream's attention at its width
        pooled_projection_dim=2 * text_width,
        # A fixed sin-cos table over 64x64 patches, cropped at the centre to each image's size: positions for up
        # to MAX_SIDE px. Its spacing is (sample_size / patch) / 64 = 1/8 per patch at every size, so a larger
        # stage sees the training positions in its middle and new ones around them.
        pos_embed_max_size=MAX_SIDE // (VAE_FACTOR * PATCH),
    )


def scheduler(cfg: Config) -> FlowMatchEulerDiscreteScheduler:
    """Euler on the flow, its sigmas shifted by the image's token count as SD3 and FLUX do (mu linear in tokens):
    no shift (mu 0) at base_size, the 64 tokens it trained on, and a shift of 8 (mu ln 8) at MAX_SIDE, 4096
    tokens: Esser et al.'s sqrt(tokens / base tokens) rule, so a 64x larger image keeps the signal-to-noise
    ratio of its shapes at each sigma."""
    side = VAE_FACTOR * PATCH
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_image_seq_len=(cfg.base_size // side) ** 2,
        max_image_seq_len=(MAX_SIDE // side) ** 2,
        base_shift=0.0,
        max_shift=math.log(MAX_SIDE / cfg.base_size),  # sqrt of the token ratio is the side ratio
    )


def text_encoder_with_projection(text: CLIPTextModel) -> CLIPTextModelWithProjection:
    """The embedded CLIPTextModel as the CLIPTextModelWithProjection SD3 asks for: the same weights, and an
    identity projection, so its pooled output (text_embeds) is the final layer's EOS state itself."""
    width = text.config.hidden_size
    config = text.config.to_dict() | {"projection_dim": width, "architectures": ["CLIPTextModelWithProjection"]}
    model = CLIPTextModelWithProjection(type(text.config)(**config))
    model.text_model.load_state_dict(text.state_dict())  # transformers 5's CLIPTextModel is the bare transformer
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(width))
    return model.eval().requires_grad_(False)


def flow_vae(base_model: str) -> AutoencoderKL:
    """The embedded VAE with shift_factor 0: SD3's pipeline adds it when decoding, and its latents were never
    shifted."""
    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae")
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def build_pipeline(cfg: Config, transformer: SD3Transformer2DModel | None = None) -> StableDiffusion3Pipeline:
    """The whole SD3 pipeline: `transformer` (else a fresh one) over the embedded VAE, tokenizer and text encoder
    (twice); no T5."""
    text = text_encoder_with_projection(CLIPTextModel.from_pretrained(cfg.base_model, subfolder="text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(cfg.base_model, subfolder="tokenizer")
    if transformer is None:
        transformer = transformer_model(cfg, text.config.hidden_size)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler(cfg),
        vae=flow_vae(cfg.base_model),
        text_encoder=text,
        tokenizer=tokenizer,
        text_encoder_2=copy.deepcopy(text),  # a copy: the two SD3 encoders are one CLIP here
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the zero T5 tokens, for the cost of one --------------------------------------------------------------


class RepeatedLastTokenAttnProcessor:
    """diffusers' JointAttnProcessor2_0 for a text sequence whose last token stands for `repeats` identical ones.

    Without T5 the pipeline appends T5_TOKENS zero vectors to the 16 CLIP tokens. Text tokens carry no position,
    so the zeros enter every block identical and stay identical; `repeats` identical keys (and values) in a
    softmax are one key whose logit is raised by log(repeats). Training on 16 + 1 text tokens with that bias
    gives the same outputs, to rounding, as the pipeline's 16 + 256, at a fifth of the tokens per image."""

    def __init__(self, repeats: int):
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        text = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        text_query, text_key, text_value = (heads(f(encoder_hidden_states)) for f in text)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.norm_added_q is not None:
            text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
        query, key, value = (
            torch.cat(pair, dim=2) for pair in ((query, text_query), (key, text_key), (value, text_value))
        )
        bias = torch.zeros(1, key.shape[2], device=query.device, dtype=query.dtype)  # added to every query row
        bias[:, -1] = self.log_repeats
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        image, text_out = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](image)), text_out


@torch.no_grad()
def encode_prompts(pipe: StableDiffusion3Pipeline, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own conditioning for `prompts` (CLIP hidden states of both encoders side by side, the
    pooled vectors), with one zero token standing for the T5_TOKENS (see RepeatedLastTokenAttnProcessor)."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=device,
        do_classifier_free_guidance=False,
        max_sequence_length=1,
    )
    return embeds, pooled


# ---- training -------------------------------------------------------------------------------------------


def batch_for(cfg: Config, step: int, latents: torch.Tensor, prompts: list[str]):
    """Step `step`'s batch, from (seed, step) alone: cached latents and their prompts ("" with probability
    caption_dropout), the noise, and sigma from a logit-normal(0, 1) (SD3's choice: most of the training where
    the velocity is hardest to predict, mid-way)."""
    rng = np.random.default_rng([cfg.seed, 5, step])
    index = rng.integers(0, len(latents), cfg.batch_size)
    dropped = rng.random(cfg.batch_size) < cfg.caption_dropout
    captions = ["" if drop else prompts[i] for i, drop in zip(index, dropped)]
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    x0 = latents[torch.from_numpy(index)]
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(cfg.batch_size, generator=generator))
    return x0, captions, noise, sigma


def flow_loss(transformer, x0, noise, sigma, embeds, pooled) -> torch.Tensor:
    """MSE between the predicted and the true velocity eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps."""
    s = sigma.view(-1, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * noise
    prediction = transformer(
        hidden_states=x_sigma,
        timestep=sigma * 1000,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]
    return F.mse_loss(prediction.float(), (noise - x0).float())


def train(cfg: Config, acc: Accelerator, work: Path, latents: torch.Tensor, prompts: list[str]) -> None:
    """Train the transformer to cfg.steps, from the checkpoint in `work` if there is one."""
    torch.manual_seed(cfg.seed)  # the initial weights
    pipe = build_pipeline(cfg)
    transformer = pipe.transformer.train()
    pipe.text_encoder.to(acc.device), pipe.text_encoder_2.to(acc.device)
    prior = None  # the runs before this one, when it started from an export: kept in its checkpoints
    if cfg.init and not (work / CHECKPOINT).exists():
        transformer.load_state_dict(exported_weights(Path(cfg.init), transformer))
        prior = prior_training(Path(cfg.init))  # read now: --out may be that folder, which the export replaces
        log.info("flow: started from %s (%s)", cfg.init, prior)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.01)
    ema = EMA(transformer, cfg.ema_decay)
    start, seconds = 0, 0.0
    if (work / CHECKPOINT).exists():
        state = load_checkpoint(work / CHECKPOINT)
        transformer.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        start, seconds = state["step"], state["train_seconds"] or 0.0
        prior = state["config"].get("prior")
        log.info("flow: resumed at step %d", start)
    transformer.set_attn_processor(RepeatedLastTokenAttnProcessor(T5_TOKENS))
    transformer, opt = acc.prepare(transformer, opt)
    ema.to(acc.device)
    schedule = lr_lambda(cfg.warmup, cfg.steps)
    started, running = time.time(), 0.0
    for step in range(start, cfg.steps):
        for group in opt.param_groups:  # a function of the step alone, so a resumed run needs no scheduler state
            group["lr"] = cfg.lr * schedule(step)
        x0, captions, noise, sigma = batch_for(cfg, step, latents, prompts)
        embeds, pooled = encode_prompts(pipe, captions, acc.device)
        with acc.autocast():
            loss = flow_loss(transformer, x0.to(acc.device), noise.to(acc.device), sigma.to(acc.device), embeds, pooled)
        acc.backward(loss)
        acc.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema.update(acc.unwrap_model(transformer), step)
        running = 0.98 * running + 0.02 * loss.item() if step > start else loss.item()
        done = step + 1
        if done % cfg.log_every == 0:
            log.info(
                "flow step %d/%d  loss %.4f  lr %.2e  %.2f s/step",
                done,
                cfg.steps,
                running,
                opt.param_groups[0]["lr"],
                (time.time() - started) / (done - start),
            )
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(
                work / CHECKPOINT,
                weights=acc.unwrap_model(transformer).state_dict(),
                optimizer=opt,
                step=done,
                config=dataclasses.asdict(cfg) | ({"prior": prior} if prior else {}),
                ema=ema.shadow,
                train_seconds=seconds + time.time() - started,
            )


def exported_weights(folder: Path, transformer) -> dict:
    """The transformer weights of an exported folder (check_init_folder found it), in float32, checked to fit
    `transformer` (names, shapes) and finite (`sc_app.weights`); ValueError in one line otherwise. Read with
    safetensors: nothing is unpickled."""
    from safetensors.torch import load_file

    from sc_app.weights import compare, module_shapes, nonfinite_message, nonfinite_names, unfit_message

    state = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    fit = compare({k: tuple(v.shape) for k, v in state.items()}, module_shapes(transformer))
    if fit.foreign or fit.missing or fit.unfit:
        what = unfit_message(fit.unfit, "it") if fit.unfit else f"first: {(fit.foreign or fit.missing)[0]}"
        raise ValueError(
            f"--init {folder}: its transformer does not fit --layers/--heads/--head-dim/--base-size ({what}); "
            "give the configuration it was trained with (its training.json)"
        )
    if bad := nonfinite_names(state.items()):
        raise ValueError(f"--init {folder}: {nonfinite_message(bad)}")
    return {k: v.float() for k, v in state.items()}


def prior_training(folder: Path) -> dict:
    """What an exported folder's training.json says was done (steps, seconds, and its own prior runs)."""
    try:
        record = json.loads((folder / "training.json").read_text())
    except (OSError, ValueError):
        return {"from": str(folder)}
    return {"from": str(folder), **{k: record[k] for k in ("steps", "train_seconds", "prior") if k in record}}


# ---- export ------------------------------------------------------------------------------------------------


def self_cascade_defaults(cfg: Config) -> dict:
    """sc_app's settings for the folder (sc_app.families.FlowModel): its own size, and K, guidance and the pivot's
    upsampling as measured on the embedded UNet model, its K's moved to the flow line at equal signal-to-noise
    ratio (`flow_k`) until they are measured on this one."""
    unet_defaults = json.loads((Path(cfg.base_model) / "self_cascade.json").read_text())
    return {
        "base_size": cfg.base_size,
        "default_k": flow_k(unet_defaults.get("default_k", 300)),
        "later_stages_k": flow_k(unet_defaults.get("later_stages_k", 150)),
        "default_guidance": unet_defaults.get("default_guidance", 3.0),
        "default_upsample": unet_defaults.get("default_upsample", "lanczos"),
    }


def flow_k(unet_k: int) -> int:
    """The flow timestep 1000 sigma with the signal-to-noise ratio of DDPM step `unet_k` on the embedded UNet's
    scaled-linear schedule: sqrt(a / (1 - a)) = (1 - sigma) / sigma (sc_app.families explains FLOW_K the same
    way)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha = float(torch.cumprod(1 - betas, 0)[unet_k])
    snr = math.sqrt(alpha / (1 - alpha))
    return round(1000 / (1 + snr))


def export(cfg: Config, work: Path) -> Path:
    """Write the EMA weights of the checkpoint in `work` as a StableDiffusion3Pipeline folder: the transformer
    and VAE in float16 (sc_app.files.save_model_folder), training.json, and a model card and self_cascade.json
    unless --out already has its own (measured and edited by hand)."""
    state = load_checkpoint(work / CHECKPOINT)
    pipe = build_pipeline(cfg)
    pipe.transformer.load_state_dict(state["ema"])
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(pipe, tmp)
    declare_absent_t5(tmp / "model_index.json")
    training = {
        "config": dataclasses.asdict(cfg),
        "steps": state["step"],
        "train_seconds": state["train_seconds"],
        "transformer_parameters": parameters,
    }
    if prior := state["config"].get("prior"):  # the runs before this one, as its starting folder recorded them
        training["prior"] = prior
    (tmp / "training.json").write_text(json.dumps(training, indent=2))
    (tmp / "self_cascade.json").write_text(json.dumps(self_cascade_defaults(cfg), indent=2))
    (tmp / "README.md").write_text(model_card(cfg, state["step"], parameters, folder_megabytes(tmp)))
    for name in KEPT_ON_EXPORT:
        if (out / name).exists():
            shutil.copy(out / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("exported %s (step %d, %.1f MB)", out, state["step"], folder_megabytes(out))
    return out


def declare_absent_t5(index_path: Path) -> None:
    """Say in model_index.json that text_encoder_3 and tokenizer_3 are absent ([null, null]), where save_pretrained
    leaves them out. diffusers 0.42 still loads such a folder only when told, as for any SD3 run without T5:
    from_pretrained(folder, text_encoder_3=None, tokenizer_3=None) (sc_app.families.load_flow_model does)."""
    index = json.loads(index_path.read_text())
    index |= {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    index_path.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def model_card(cfg: Config, step: int, parameters: int, megabytes: float) -> str:
    width = cfg.heads * cfg.head_dim
    return f"""# shapes-flow: the embedded flow-matching model

A rectified-flow transformer in Stable Diffusion 3's layout (`StableDiffusion3Pipeline`), trained by Self-Cascade
Studio on the shapes world (`sc_app.shapes`: one to three coloured circles, squares and triangles on a plain
background) at {cfg.base_size}x{cfg.base_size} pixels. Plain diffusers loads and samples it, offline:

    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained("assets/shapes-flow", text_encoder_3=None, tokenizer_3=None)
    image = pipe("a red circle and a blue square", height={cfg.base_size}, width={cfg.base_size},
                 guidance_scale=3.0, num_inference_steps=28).images[0]

and Self-Cascade Studio runs it as `--model embedded-flow` (`self_cascade.json`: its base size and defaults).

## Layout ({megabytes:.1f} MB, safetensors only)

- `transformer/`: `SD3Transformer2DModel`, {parameters / 1e6:.2f}M parameters in float16: {cfg.layers} joint blocks
  of width {width} ({cfg.heads} heads of {cfg.head_dim}), 2x2 patches of the 4-channel latents
  ({cfg.base_size // VAE_FACTOR}x{cfg.base_size // VAE_FACTOR} cells, {(cfg.base_size // VAE_FACTOR // PATCH) ** 2}
  tokens at the base size); positions from SD3's fixed sin-cos table of 64x64 patches, cropped at the centre,
  so sides up to {MAX_SIDE} px.
- `vae/`: the embedded image model's VAE (`assets/shapes-ldm/vae`), unchanged but for `shift_factor` 0, which
  SD3's pipeline reads; 4x downsampling, no attention.
- `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`: the embedded model's CLIP text encoder
  (frozen during this training) as `CLIPTextModelWithProjection` with an identity projection, so that it gives
  the pooled embedding SD3 needs. **`text_encoder_2` is a copy of `text_encoder`** (SD3 expects two CLIPs). No
  T5 (`model_index.json` says so; diffusers wants `text_encoder_3=None, tokenizer_3=None` passed, as for any SD3
  run without it): the pipeline feeds {T5_TOKENS} zero tokens in its place, and the model was trained with them.
- `scheduler/`: `FlowMatchEulerDiscreteScheduler` with resolution-dependent shift: mu linear in the token
  count from 0 at {(cfg.base_size // (VAE_FACTOR * PATCH)) ** 2} tokens ({cfg.base_size} px, no shift) to ln 8 at
  {(MAX_SIDE // (VAE_FACTOR * PATCH)) ** 2} tokens ({MAX_SIDE} px), the sqrt(tokens) rule of Esser et al. (2024)
  at the ends.

Why SD3's layout rather than FLUX's: it takes the embedded VAE as it is, CLIP is its only required text
encoder (FLUX needs a T5), and its transformer is small to build; its scheduler shifts by resolution as FLUX's.

## Training

{step} steps of batch {cfg.batch_size} (learning rate {cfg.lr:g}, {cfg.warmup} warm-up steps then cosine to a tenth,
EMA {cfg.ema_decay}, caption dropout {cfg.caption_dropout}), on {cfg.cache_scenes} scenes rendered and encoded once:
rectified flow as SD3 trains it (x = (1 - sigma) x0 + sigma eps, target eps - x0, sigma logit-normal(0, 1), plain
MSE). `training.json` holds the exact configuration. To train it (resumable: the same command continues from
the checkpoint in `--work`; `accelerate launch -m tuner.train_flow ...` on a GPU):

    python -m tuner.train_flow --work {cfg.work} --out {cfg.out} --steps {cfg.steps} --batch-size {cfg.batch_size}

`self_cascade.json` starts from the embedded UNet model's measured defaults, its K's moved to the flow line at
equal signal-to-noise ratio; measure them on this model before trusting them.
"""


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg, export_only = parse_args()
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    if not export_only:
        vae = flow_vae(cfg.base_model).to(acc.device)
        # the embedded model's latents, scaled by its own factor: the same cache train_base builds
        latents, prompts = latent_cache(cfg, vae, work, acc.device, measure_scale=False)
        train(cfg, acc, work, latents, prompts)
    if not (work / CHECKPOINT).exists():
        raise SystemExit(f"error: {work / CHECKPOINT}: no checkpoint to export (train first)")
    if acc.is_main_process:
        export(cfg, work)


if __name__ == "__main__":
    main()
