"""Weights files whose contents do not fit what loads them (LoRAs, feature upsamplers, model folders, the SR and
video models): tensors of another shape, names of another architecture, values that are not finite. Each is
refused when it is loaded, in one line naming the file and what is wrong, through the library, the command line
and the page; files that fit still load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sc_app.files import write_safetensors
from tiny_models import make_upscaler, random_lora

LORA_RUN = dict(num_inference_steps=2, seed=0)


def refused(call, *args, **kwargs) -> str:
    """The ValueError `call` raises: one line, returned for the test to read."""
    with pytest.raises(ValueError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def edited(path: Path, edit, out: Path | None = None) -> Path:
    """A copy of the safetensors file at `path` (or the file itself) with `edit(tensors)` applied, its metadata
    kept."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = {key: value.clone() for key, value in load_file(str(path)).items()}
    edit(tensors)
    out = out or path
    save_file(tensors, str(out), metadata=metadata)
    return out


def poison(key: str, value=float("nan")):
    """An edit that puts `value` into the tensor `key`."""

    def edit(tensors):
        tensors[key].view(-1)[0] = value

    return edit


def first(tensors, ends: str = "", ndim: int = 2) -> str:
    return next(key for key in sorted(tensors) if key.endswith(ends) and tensors[key].ndim == ndim)


# ---- LoRA files ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_lora(sd_model, tmp_path_factory) -> Path:
    return random_lora(sd_model, tmp_path_factory.mktemp("lora") / "good.safetensors")


def lora_like(good: Path, tmp_path: Path, name: str, edit, keep_metadata: bool = True) -> Path:
    out = edited(good, edit, tmp_path / name)
    if not keep_metadata:  # a LoRA of someone else's: no fingerprint to compare, only its tensors
        save_file(load_file(str(out)), str(out))
    return out


def test_a_lora_of_wrong_shapes_is_refused_when_loaded(sd_model, good_lora, tmp_path):
    from sc_app.lora import check_loras

    def widen(tensors):
        key = first(tensors, "lora.down.weight")
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)

    bad = lora_like(good_lora, tmp_path, "wide.safetensors", widen)
    message = refused(check_loras, [bad], sd_model)
    assert message.startswith("LoRA wide.safetensors: 1 tensor does not fit this model's UNet (unet.down_blocks.0.")
    assert "lora_A.weight: shape (2, 9), expected (2, 8))" in message


def test_a_lora_of_another_architecture_is_refused_when_loaded(sd_model, sdxl_model, tmp_path):
    from sc_app.lora import check_loras

    made_for_xl = random_lora(sdxl_model, tmp_path / "xl.safetensors")
    xl = lora_like(made_for_xl, tmp_path, "xl-bare.safetensors", lambda t: None, keep_metadata=False)
    message = refused(check_loras, [xl], sd_model)
    assert message.startswith("LoRA xl-bare.safetensors: ") and "for layers this model" in message
    assert message.endswith("a LoRA for another architecture")
    flux = write_safetensors(
        {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2),
        },
        tmp_path / "flux.safetensors",
    )
    assert "2 tensors are for layers this model" in refused(check_loras, [flux], sd_model)
    unet = write_safetensors({"conv_in.weight": torch.zeros(8, 4, 3, 3)}, tmp_path / "unet.safetensors")
    assert refused(check_loras, [unet], sd_model) == (
        "LoRA unet.safetensors: it holds 1 tensor that no LoRA has (no 'lora' in the name): conv_in.weight"
    )


def test_a_lora_that_is_not_finite_is_refused_when_loaded(sd_model, good_lora, tmp_path):
    from sc_app.lora import check_loras

    def nan_and_inf(tensors):
        keys = sorted(tensors)
        tensors[keys[0]].view(-1)[0] = float("nan")
        tensors[keys[1]].view(-1)[-1] = float("inf")

    bad = lora_like(good_lora, tmp_path, "nan.safetensors", nan_and_inf)
    message = refused(check_loras, [bad], sd_model)
    assert message.startswith("LoRA nan.safetensors: 2 tensors are not finite (NaN or inf), e.g. unet.")
    from sc_app.lora import check_lora_files

    assert refused(check_lora_files, [bad]) == message  # no model needed for this one


def test_kohya_loras_are_checked_in_the_names_diffusers_gives_them(sd_model, tmp_path):
    """A kohya LoRA (lora_unet_..., lora_te_..., alphas) that fits loads; one of other widths is refused, for
    the UNet and for the text encoder alike."""
    from sc_app.api import generate
    from sc_app.lora import check_loras

    def kohya(unet_width: int = 8, text_width: int = 16) -> dict:
        torch.manual_seed(0)
        tensors = {}
        for proj in ("to_q", "to_k", "to_v", "to_out_0"):
            base = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_{proj}"
            tensors |= {
                f"{base}.lora_down.weight": torch.randn(2, unet_width),
                f"{base}.lora_up.weight": torch.randn(8, 2),
            }
            tensors[f"{base}.alpha"] = torch.tensor(2.0)
        for proj in ("q_proj", "out_proj"):
            base = f"lora_te_text_model_encoder_layers_0_self_attn_{proj}"
            tensors |= {
                f"{base}.lora_down.weight": torch.randn(2, text_width),
                f"{base}.lora_up.weight": torch.randn(16, 2),
            }
            tensors[f"{base}.alpha"] = torch.tensor(2.0)
        return tensors

    good = write_safetensors(kohya(), tmp_path / "kohya.safetensors")
    assert [lora.path for lora in check_loras([good], sd_model)] == [good]
    plain = generate(sd_model, "a red circle", 16, 16, method="direct", **LORA_RUN)
    styled = generate(sd_model, "a red circle", 16, 16, method="direct", loras=[(good, 1.0)], **LORA_RUN)
    assert not torch.equal(plain.stages[-1].latents, styled.stages[-1].latents)
    wide_unet = write_safetensors(kohya(unet_width=12), tmp_path / "unet12.safetensors")
    assert "4 tensors do not fit this model's UNet (unet.down_blocks.0." in refused(check_loras, [wide_unet], sd_model)
    wide_text = write_safetensors(kohya(text_width=12), tmp_path / "te12.safetensors")
    message = refused(check_loras, [wide_text], sd_model)
    assert "2 tensors do not fit this model's text encoder (text_encoder.encoder.layers.0.self_attn." in message


def test_an_unfit_lora_is_refused_by_the_api_and_the_command_line(sd_model, sd_folder, good_lora, tmp_path, capsys):
    from sc_app.__main__ import main
    from sc_app.api import generate

    bad = lora_like(good_lora, tmp_path, "nan.safetensors", poison(sorted(load_file(str(good_lora)))[0]))
    message = refused(generate, sd_model, "a red circle", 32, 32, loras=[(bad, 1.0)], **LORA_RUN)
    assert message.startswith("LoRA nan.safetensors: 1 tensor is not finite")
    assert sd_model.pipe.get_list_adapters() == {}  # refused before anything was loaded into the model
    argv = ["generate", "--model", str(sd_folder), "--prompt", "a red circle", "--height", "32", "--width", "32"]
    argv += ["--steps", "2", "--device", "cpu", "--lora", str(bad), "--out", str(tmp_path / "run")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nan.safetensors: 1 tensor is not finite (NaN or inf)" in err
    assert not (tmp_path / "run").exists()


def test_a_video_lora_that_does_not_fit_is_refused(animatediff_model, tmp_path):
    from sc_app.video import check_video_loras

    good = random_lora(animatediff_model, tmp_path / "motion.safetensors")
    assert check_video_loras([good], animatediff_model)
    bad = edited(
        good, lambda t: t.update({first(t, "lora.up.weight"): torch.zeros(3, 2)}), tmp_path / "bad.safetensors"
    )
    message = refused(check_video_loras, [bad], animatediff_model)
    assert message.startswith("LoRA bad.safetensors: 1 tensor does not fit this model's UNet (unet.")
    assert message.endswith("shape (3, 2), expected (8, 2))")


# ---- model folders --------------------------------------------------------------------------------------


def folder_like(folder: Path, tmp_path: Path, part: str, edit) -> Path:
    """A copy of the model folder with `edit` applied to `part`'s weights file."""
    copy = shutil.copytree(folder, tmp_path / f"model-{part}")
    (path,) = (copy / part).glob("*.safetensors")
    edited(path, edit)
    return copy


@pytest.mark.parametrize("part, key", [("unet", "conv_norm_out.weight"), ("text_encoder", None), ("vae", None)])
def test_a_model_folder_with_weights_that_are_not_finite_is_refused(sd_folder, tmp_path, part, key):
    from sc_app.models import load_model

    (path,) = (sd_folder / part).glob("*.safetensors")
    key = key or sorted(load_file(str(path)))[-1]
    folder = folder_like(sd_folder, tmp_path, part, poison(key, float("inf")))
    message = refused(load_model, str(folder), device="cpu")
    assert message == f"model {str(folder)!r}: {part}/: 1 tensor is not finite (NaN or inf): {key}"


def test_a_model_folder_whose_weights_do_not_fit_its_config_is_refused(sd_folder, tmp_path):
    from sc_app.models import load_model

    def widen(tensors):
        key = first(tensors, "to_k.weight")
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)

    folder = folder_like(sd_folder, tmp_path, "unet", widen)
    message = refused(load_model, str(folder), device="cpu")
    assert message.startswith(f"model {str(folder)!r}: unet/diffusion_pytorch_model.safetensors: 1 tensor does not")
    assert message.endswith("to_k.weight: shape (8, 9), expected (8, 8))") and "fit its config.json" in message


@pytest.mark.parametrize("part", ["unet", "text_encoder", "vae"])
def test_a_model_folder_with_weights_of_another_layout_is_refused(sd_folder, tmp_path, part):
    from sc_app.models import load_model

    def rename(tensors):
        for key in sorted(tensors)[:3]:
            tensors[f"transformer.{key}"] = tensors.pop(key)

    folder = folder_like(sd_folder, tmp_path, part, rename)
    message = refused(load_model, str(folder), device="cpu")
    assert f": {part}/" in message and "3 tensors its config.json needs are missing, e.g. " in message
    assert "3 tensors are of another layout, e.g. transformer." in message


def test_a_hub_models_unfit_weights_are_refused_in_one_line(sd_folder, tmp_path, monkeypatch):
    """What the loaders raise themselves (a hub id's files are not checked before they load): one line."""
    import sc_app.models as models

    monkeypatch.setattr(models, "check_folder_weights", lambda *a: None, raising=False)
    (path,) = (sd_folder / "vae").glob("*.safetensors")
    key = first(load_file(str(path)), "to_k.weight")
    wide = folder_like(sd_folder, tmp_path, "vae", lambda t: t.update({key: torch.zeros(8, 9)}))
    assert refused(models.load_model, str(wide), device="cpu") == (
        f"model {str(wide)!r}: its weight {key} has shape (8, 9), its config expects (8, 8)"
    )
    shutil.rmtree(wide)
    missing = folder_like(sd_folder, tmp_path, "unet", lambda t: t.pop("conv_in.weight"))
    assert refused(models.load_model, str(missing), device="cpu") == (
        f"model {str(missing)!r}: unet/: 1 tensor is missing from its files: conv_in.weight"
    )


def test_old_names_that_the_loaders_rename_still_load(sd_folder, tmp_path):
    """No false refusals: a VAE saved with diffusers' old attention names and a CLIP text encoder with its
    `text_model.` prefix load as before."""
    from sc_app.models import load_model

    def old_attention(tensors):
        for key in [k for k in tensors if ".attentions.0." in k]:
            for new, old in (
                (".to_q.", ".query."),
                (".to_k.", ".key."),
                (".to_v.", ".value."),
                (".to_out.0.", ".proj_attn."),
            ):
                if new in key:
                    tensors[key.replace(new, old)] = tensors.pop(key)

    folder = folder_like(sd_folder, tmp_path, "vae", old_attention)
    (path,) = (folder / "text_encoder").glob("*.safetensors")
    edited(path, lambda t: t.update({f"text_model.{k}": t.pop(k) for k in list(t)}))
    reference = load_model(str(sd_folder), device="cpu")
    model = load_model(str(folder), device="cpu")
    for part in ("vae", "text_encoder"):
        ours, theirs = getattr(model.pipe, part).state_dict(), getattr(reference.pipe, part).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_the_sr_model_and_the_video_model_are_checked_when_loaded(
    sd_model, sd_folder, modelscope_folder, tmp_path, monkeypatch
):
    from sc_app.baselines import upscale
    from sc_app.video import load_video_model

    sr = make_upscaler(tmp_path / "sr", sd_folder)
    edited(next((sr / "unet").glob("*.safetensors")), poison("conv_in.weight"))
    monkeypatch.setattr(upscale, "_loaded", {})
    assert refused(upscale.load_upscaler, str(sr), sd_model) == (
        f"sr_model {str(sr)!r}: unet/: 1 tensor is not finite (NaN or inf): conv_in.weight"
    )
    video = folder_like(modelscope_folder, tmp_path, "unet", poison("conv_in.weight"))
    assert refused(load_video_model, str(video), device="cpu") == (
        f"model {str(video)!r}: unet/: 1 tensor is not finite (NaN or inf): conv_in.weight"
    )


def test_the_shipped_models_fit():
    from sc_app.models import ASSETS, WEIGHT_FOLDERS
    from sc_app.weights import check_folder_weights

    for folder in ("shapes-ldm", "shapes-sr", "shapes-video"):
        check_folder_weights(f"{folder}: ", ASSETS / folder, WEIGHT_FOLDERS)


# ---- the helpers ---------------------------------------------------------------------------------------


def test_compare_names_what_is_foreign_missing_and_of_another_shape():
    from sc_app.weights import compare, nonfinite_names

    fit = compare({"a": (2, 3), "b": (4,), "x": (1,)}, {"a": (2, 3), "b": (5,), "c": (1,)})
    assert (fit.foreign, fit.missing, fit.unfit) == (["x"], ["c"], [("b", (4,), (5,))])
    named = [("f", torch.tensor([1.0, float("nan")])), ("i", torch.tensor([1, 2])), ("g", torch.ones(2))]
    assert nonfinite_names(named) == ["f"]
