"""The app under concurrent requests over loopback HTTP (Gradio's own client): nothing lost, every image the
pipeline's for its class and seed, its result files cleaned up, and the server's memory reported.

ENAT_RUN_SLOW=1 also runs 200 requests and prints the server's RSS growth (the number in the docs' limits page)."""

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from enat_diffusers import load_demo_pipeline
from enat_diffusers.app import DISPLAY_SIZE

from .app_server import running_app, server_rss_bytes

gradio_client = pytest.importorskip("gradio_client", reason="the app needs the app extra: pip install -e '.[app]'")

CONCURRENT_REQUESTS = 30
CACHE_MAX_AGE = 20  # seconds, for the cleanup test's server: short so that the test sees the cleanup
SIDE = 16  # the digits demo's images
SCALE = DISPLAY_SIZE // SIDE


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app-load")
    with running_app(folder) as (url, process, log_path):
        yield url, process, folder


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    # The client's downloads go to a folder of its own: by default it shares /tmp/gradio with a local server.
    return gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def pipeline():
    pipeline = load_demo_pipeline("digits")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_image(pipeline, class_id: int, seed: int) -> np.ndarray:
    """What the pipeline draws alone for one class and seed with the page's defaults."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image = pipeline(class_labels=[class_id], generator=[torch.Generator().manual_seed(seed)]).images[0]
    finally:
        torch.set_num_threads(threads)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def request(client, class_id: int, seed: int):
    """One Generate click: the gallery's one image file, or the exception the client raised."""
    try:
        gallery, _, status = client.predict([str(class_id)], 1, 8, 3.5, "cosine", seed, api_name="/generate")
        return gallery[0]["image"]
    except Exception as error:  # counted as lost below
        return error


def check_all_received(client, pipeline, requests: list[tuple[int, int]]) -> None:
    with ThreadPoolExecutor(len(requests)) as pool:
        received = list(pool.map(lambda item: request(client, *item), requests))
    lost = [(item, answer) for item, answer in zip(requests, received, strict=True) if isinstance(answer, Exception)]
    assert not lost, f"{len(lost)} of {len(requests)} requests lost: {lost[:3]}"
    expected = {item: pipeline_image(pipeline, *item) for item in set(requests)}
    for item, path in zip(requests, received, strict=True):
        assert Path(path).stat().st_size > 0, f"empty image for class/seed {item}"
        with PIL.Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        assert pixels.shape == (DISPLAY_SIZE, DISPLAY_SIZE, 3)
        assert np.abs(pixels[::SCALE, ::SCALE] - expected[item]).max() <= 1, f"wrong image for class/seed {item}"


def test_concurrent_identical_requests_all_get_the_pipelines_image(server, client, pipeline):
    check_all_received(client, pipeline, [(7, 0)] * CONCURRENT_REQUESTS)


def test_concurrent_mixed_requests_all_get_the_image_of_their_class_and_seed(server, client, pipeline):
    check_all_received(client, pipeline, [(seed % 10, seed) for seed in range(CONCURRENT_REQUESTS)])


def test_result_files_are_deleted_after_the_cache_age(tmp_path):
    with running_app(tmp_path, "--cache_max_age", str(CACHE_MAX_AGE)) as (url, _, _):
        # Not downloaded: the files are looked at on the server's disk.
        client = gradio_client.Client(url, verbose=False, download_files=False)
        client.predict(["3"], 1, 8, 3.5, "cosine", 1, api_name="/generate")
        results = tmp_path / "gradio-cache" / "enat-app"
        assert any(results.rglob("*.png"))
        # Gradio's cleanup runs every CACHE_MAX_AGE seconds and deletes files older than that.
        deadline = time.monotonic() + 2 * CACHE_MAX_AGE + 30
        while any(results.rglob("*.png")) and time.monotonic() < deadline:
            time.sleep(2)
        assert not any(results.rglob("*.png"))


@pytest.mark.skipif(os.environ.get("ENAT_RUN_SLOW") != "1", reason="200 requests: set ENAT_RUN_SLOW=1")
def test_report_server_memory_over_200_requests(server, client):
    pid = server[1].pid
    for seed in range(20):  # warm-up: first-call allocations
        request(client, seed % 10, seed)
    before = server_rss_bytes(pid)
    steps = []
    for start in range(0, 200, 20):
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda seed: request(client, seed % 10, seed), range(start, start + 20)))
        assert not [answer for answer in answers if isinstance(answer, Exception)]
        steps.append(f"{start + 20}: {server_rss_bytes(pid) / 2**20:.0f}")
    after = server_rss_bytes(pid)
    print(
        f"\nserver RSS: {before / 2**20:.0f} MiB after 20 warm-up requests, {after / 2**20:.0f} MiB after 200 more "
        f"({(after - before) / 2**20:+.1f} MiB, {(after - before) / 200 / 2**10:+.0f} KiB per request); "
        f"MiB after each 20: {', '.join(steps)}"
    )


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", r"Image: 'empty.png' is empty \(0 bytes\), not an image."),
        ("text", r"Image: 'notes.png' is not an image file"),
        ("huge", r"Image: 'huge.png' is 13000x13000 pixels; images up to"),
        ("truncated", r"Image: 'cut.png' could not be decoded"),
    ],
)
def test_a_bad_upload_to_the_edit_tab_gets_a_sentence_in_the_page(server, client, tmp_path, kind, message):
    from .test_app import bad_image_file

    path = bad_image_file(
        tmp_path, {"empty": "empty file", "text": "text file", "huge": "huge file"}.get(kind, "truncated file")
    )
    editor = {"background": gradio_client.handle_file(str(path)), "layers": [], "composite": None}
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(editor, "7", "image-to-image", 0.5, 1, 8, 3.5, 0, api_name="/edit")
    assert isinstance(request(client, 7, 0), str)  # and the app keeps serving
