"""What the server serves: of the work folder only served/, what pages are shown; never a file the app keeps.

Each kind of file the app keeps (the review database and the secret that signs reviewers' browser ids, the pool's
files and a backup of the votes, a tuning job's uploaded images, checkpoint and log, an uploaded adapter and
LoRA, a stop file) is made where the app keeps it, then asked for through gradio's file route in every way a path
can be written (absolute, relative, through served/ with '..', by a link inside served/); each must be refused,
while the images and the CSV a page is shown still load.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client, handle_file

from tiny_models import random_lora

MAX_PIXELS = 64 * 64
ROUTES = ("gradio_api/file={}", "gradio_api/file/{}")  # the route and its deprecated spelling, one function


def serve(model, work: Path):
    from test_app import free_port

    from sc_app import ui

    demo = ui.build(model, max_pixels=MAX_PIXELS, work_dir=work)
    port = free_port()
    ui.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def app(sd_model, tmp_path_factory):
    from test_review import samples

    work = tmp_path_factory.mktemp("work")
    demo, url = serve(sd_model, work)
    demo.studio.review.store.add(samples(2), "test")
    yield SimpleNamespace(url=url, studio=demo.studio, demo=demo, work=work)
    demo.close()


def client_for(url: str, folder: Path) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(folder))


def ways_to_ask(path: Path, served: Path) -> list[str]:
    """Every way to write `path` in the file route: absolute, relative to the server's folder, and through the
    served folder with '..' (as it is, and percent-encoded so that no client tidies it away first)."""
    through_served = f"{served}/{os.path.relpath(path, served)}"
    return [
        str(path),
        os.path.relpath(path),
        through_served,
        through_served.replace("..", "%2E%2E"),
    ]


def fetch(url: str, path: str) -> list[int]:
    """The status of asking for `path` by each spelling of the file route."""
    return [httpx.get(url + route.format(path), timeout=60).status_code for route in ROUTES]


def kept_files(app, tmp_path: Path) -> dict[str, Path]:
    """One file of each kind the app keeps, made where the app keeps it: through the page's API where a user
    makes it (a vote, an adapter and a LoRA uploaded by another user), else as the app writes it."""
    from sc_app.upsampler import Adapter, save_adapter
    from tuner.upsampler_training import checkpoint_path

    studio, store = app.studio, app.studio.review.store
    client = client_for(app.url, tmp_path / "other-user")
    token = client.predict("served-files-reviewer", api_name="/review_pair")[2]
    client.predict("served-files-reviewer", token, "left", ["layout"], api_name="/review_vote")
    adapter = save_adapter(Adapter(studio.model.unet.config, base_model=studio.model.name), tmp_path / "a.safetensors")
    adapter_label = client.predict(handle_file(str(adapter)), api_name="/load_adapter")[0]["value"]
    lora = random_lora(studio.model, tmp_path / "style.safetensors")
    lora_label = client.predict(handle_file(str(lora)), api_name="/load_lora")[0]["value"]
    job = studio._new_folder(studio.jobs_dir)  # a tuning job, as `TuneHandlers.tune` lays it out
    (job / "data").mkdir()
    (job / "data" / "00000.png").write_bytes(adapter.read_bytes()[:64])  # another user's image
    checkpoint = checkpoint_path(job / "adapter.safetensors")
    checkpoint.write_bytes(b"checkpoint")
    (job / "train.log").write_text("step 1 loss 0.5\n")
    (job / "stop").touch()
    video_lora = studio.video.loras.uploads / "uploaded-motion.safetensors"
    video_lora.parent.mkdir(parents=True, exist_ok=True)
    video_lora.write_bytes(b"lora")
    backup = store.write_csv(store.root / "backups" / "votes-before-reset.csv")
    stop = studio.stops_dir / "20260101-000000-stop"
    stop.touch()
    files = {
        "review database": store.path,
        "browser secret": store.root / "browser-secret",
        "pool image": store.images_dir / store.items()[0]["file"],
        "votes backup": backup,
        "tuning upload": job / "data" / "00000.png",
        "tuning checkpoint": checkpoint,
        "tuning log": job / "train.log",
        "job stop file": job / "stop",
        "uploaded adapter": studio.adapter_dir / f"{adapter_label}.safetensors",
        "uploaded LoRA": studio.loras.uploads / f"{lora_label}.safetensors",
        "uploaded video LoRA": video_lora,
        "run stop file": stop,
    }
    wal = store.path.with_name(store.path.name + "-wal")
    if wal.exists():
        files["review database log"] = wal
    assert all(path.is_file() for path in files.values()), [k for k, p in files.items() if not p.is_file()]
    return files


def test_no_file_the_app_keeps_is_served(app, tmp_path):
    served = app.studio.served_dir
    for kind, path in kept_files(app, tmp_path).items():
        for way in ways_to_ask(path, served):
            assert all(400 <= status < 500 for status in fetch(app.url, way)), f"{kind} served as {way}"


def test_a_link_inside_the_served_folder_leads_nowhere_private(app, tmp_path):
    secret = app.studio.review.store.root / "browser-secret"
    link = app.studio.runs_dir / "secret.png"
    link.symlink_to(secret)
    try:
        assert all(400 <= status < 500 for status in fetch(app.url, str(link)))
    finally:
        link.unlink()


def test_what_a_page_is_shown_still_loads(app, tmp_path):
    client = client_for(app.url, tmp_path)
    gallery, final, status, *_ = client.predict("a red circle", steps=3, seed=0, api_name="/generate")
    assert status.startswith("Done") and Path(final).is_file() and len(gallery) == 2  # fetched by the client
    [shown] = app.studio.runs_dir.glob(f"*/{Path(final).name}")
    assert fetch(app.url, str(shown)) == [200, 200]  # and served by its own path too
    assert httpx.get(app.url + ROUTES[0].format(shown), timeout=60).content == Path(final).read_bytes()
    *_, votes_csv = client.predict(api_name="/review_results")
    [exported] = app.studio.served_dir.glob(f"review-exports/{Path(votes_csv).name}")
    assert fetch(app.url, str(exported)) == [200, 200]


def test_the_server_serves_only_the_served_folder_and_refuses_every_private_one(app):
    studio, demo = app.studio, app.demo
    assert demo.allowed_paths == [str(studio.served_dir)]
    private = {Path(p) for p in demo.blocked_paths}
    for folder in (studio.jobs_dir, studio.stops_dir, studio.adapter_dir, studio.loras.uploads):
        assert any(folder.is_relative_to(p) for p in private), folder
    assert studio.video.loras.uploads.parent in private and studio.review.store.root in private
    assert not any(studio.served_dir.is_relative_to(p) for p in private)
    assert (studio.review.store.root / "browser-secret").stat().st_mode & 0o077 == 0  # the server's user's alone


def test_a_review_store_outside_the_work_folder_is_not_served_either(sd_model, tmp_path, monkeypatch):
    """On a Space with persistent storage the votes live under /data, outside the work folder."""
    from sc_app.ui import review as ui_review

    data = tmp_path / "data" / "self-cascade-studio" / "review"
    monkeypatch.setattr(ui_review, "review_dir", lambda *args: data)
    demo, url = serve(sd_model, tmp_path / "work")
    try:
        store = demo.studio.review.store
        assert store.root == data and str(data) in demo.blocked_paths
        for path in (store.path, data / "browser-secret"):
            assert path.is_file()
            for way in (str(path), os.path.relpath(path)):
                assert all(400 <= status < 500 for status in fetch(url, way)), way
    finally:
        demo.close()


def test_an_upload_is_kept_by_gradio_under_a_keyed_name(app):
    """What gradio itself exposes: every upload (to the page or the API) lands in its upload cache and is served to
    whoever holds its path, for up to a day (the page's `delete_cache`). The path's folder is a hash of the
    content keyed with a random seed of the installation, so holding the same file does not give its path."""
    from gradio.utils import get_upload_folder

    data = b"another user's upload"
    [path] = httpx.post(app.url + "gradio_api/upload", files={"files": ("mine.txt", data)}, timeout=60).json()
    assert Path(path).parent.parent == Path(get_upload_folder())
    assert httpx.get(app.url + ROUTES[0].format(path), timeout=60).content == data  # to whoever holds its path
    guessed = Path(get_upload_folder()) / hashlib.sha256(data).hexdigest() / "mine.txt"
    assert guessed != Path(path) and all(400 <= status < 500 for status in fetch(app.url, str(guessed)))
