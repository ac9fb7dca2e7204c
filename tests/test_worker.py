"""The actor: renders one at a time in ticket order while commits overlap them; each ok row commits video and poster."""

import threading
import time

import numpy as np

from kandinsky_batch.fleet import worker as worker_module
from kandinsky_batch.output.poster import poster
from kandinsky_batch.output.record import Stamp
from kandinsky_batch.intake.rows import Task
from kandinsky_batch.errors import StorageUnavailable
from kandinsky_batch.output.layout import poster_key
from kandinsky_batch.output.video import decode
from kandinsky_batch.fleet.worker import RenderWorker, Turnstile, WorkerSpec


def test_turnstile_serves_tickets_in_order_whatever_order_threads_arrive():
    turnstile, order, inside = Turnstile(), [], []

    def call(ticket):
        with turnstile.turn(ticket):
            inside.append(ticket)
            assert len(inside) == 1, "two renders at once"
            time.sleep(0.01)
            order.append(ticket)
            inside.remove(ticket)

    threads = [threading.Thread(target=call, args=(t,)) for t in (3, 1, 0, 4, 2)]
    for thread in threads:
        thread.start()
        time.sleep(0.005)  # arrive out of order on purpose
    for thread in threads:
        thread.join(timeout=10)
    assert order == [0, 1, 2, 3, 4]


def test_a_failed_render_still_lets_the_next_ticket_through():
    turnstile = Turnstile()
    try:
        with turnstile.turn(0):
            raise RuntimeError("render failed")
    except RuntimeError:
        pass
    done = threading.Event()
    thread = threading.Thread(target=lambda: turnstile.turn(1).__enter__() and None or done.set())
    thread.start()
    thread.join(timeout=5)
    assert done.is_set()


# -- committing a row: video and poster, without Ray (the actor class is plain Python) -----------------------

def _worker(uri: str, options: dict | None, fmt: str = "npy") -> RenderWorker:
    # `simulated:0` renders a seed-derived stack at once: no model, no sleep.
    spec = WorkerSpec(model_path="simulated:0", output_uri=uri, stamp=Stamp("simulated:0", fmt, 8),
                      output_storage_options=options or {}, retries=0)
    return RenderWorker(spec, replica=0)


def _task(row_id: str, seed: int = 1, overwrite: bool = False) -> Task:
    return Task(id=row_id, row_index=0, prompt="a cat", negative_prompt=None, seed=seed, height=16, width=16,
                num_frames=1, num_inference_steps=2, guidance_scale=1.0, overwrite=overwrite)


def _clip(value: int) -> np.ndarray:
    return np.full((3, 48, 64, 3), value, np.uint8)


def test_an_ok_row_commits_its_poster_of_the_same_frames(output_target):
    worker = _worker(*output_target)
    [row] = worker.render([(_task("clip-1"), 1)], ticket=0).rows
    storage = worker.storage
    assert row["status"] == "ok" and row["poster_key"] == poster_key("clip-1")
    assert row["key"] == "videos/clip-1.npy" and "uri" not in row  # located by key, relative to the prefix
    frames = decode(storage.get_bytes(row["key"]), "npy")
    assert storage.get_bytes(row["poster_key"]) == poster(frames)
    assert storage.list("posters") == ["posters/clip-1.jpg"]


def test_an_earlier_attempts_poster_stands_unless_the_task_overwrites(output_target):
    worker = _worker(*output_target)
    storage = worker.storage
    storage.put_bytes(poster_key("clip-1"), poster(_clip(10)))  # an earlier attempt's (its replica then died)
    row = worker._commit(_task("clip-1"), {"id": "clip-1"}, _clip(200), 0.1)
    assert row["status"] == "ok" and row["poster_key"] == poster_key("clip-1")
    assert storage.get_bytes(poster_key("clip-1")) == poster(_clip(10))
    row = worker._commit(_task("clip-1", overwrite=True), {"id": "clip-1"}, _clip(200), 0.1)
    assert row["status"] == "ok" and storage.get_bytes(poster_key("clip-1")) == poster(_clip(200))


def test_a_poster_error_fails_the_row_and_commits_nothing(output_target, monkeypatch):
    worker = _worker(*output_target)

    def broken(frames):
        raise OSError("encoder JPEG not available")

    monkeypatch.setattr(worker_module, "poster", broken)
    [row] = worker.render([(_task("clip-1"), 1)], ticket=0).rows
    assert row["status"] == "failed" and "encoder JPEG not available" in row["error"]
    assert row.get("poster_key") is None and row.get("key") is None
    assert worker.storage.list("videos") == [] and worker.storage.list("posters") == []


def test_storage_down_for_the_poster_leaves_the_row_unstored(output_target, monkeypatch):
    worker = _worker(*output_target)
    storage = worker.storage
    create = storage.put_bytes_if_absent

    def down_for_posters(key, data):
        if key.startswith("posters/"):
            raise StorageUnavailable(key, ConnectionError("connection reset"))
        return create(key, data)

    monkeypatch.setattr(storage, "put_bytes_if_absent", down_for_posters)
    result = worker.render([(_task("clip-1"), 1)], ticket=0)
    assert (result.rows, result.unstored) == ([], (0,)) and "posters/clip-1.jpg" in result.outage
    # The video stands without a manifest row: a re-run adopts it and makes its poster then.
    assert storage.list("videos") == ["videos/clip-1.npy"] and storage.list("posters") == []


def test_an_expanded_prompt_is_recorded_with_its_render(output_target):
    """A Kandinsky 6 render of an expanded prompt (here video-only: a Clip without sound) commits its frames and
    records the prompt it encoded; a render that expanded nothing records none."""
    from pipelines.kinds import Clip

    worker = _worker(*output_target)
    row = worker._commit(_task("clip-1"), {"id": "clip-1"}, Clip(_clip(30), prompt="a cat, in the rain"), 0.1)
    assert row["status"] == "ok" and row["expanded_prompt"] == "a cat, in the rain"
    assert "audio_sample_rate" not in row
    assert np.array_equal(decode(worker.storage.get_bytes(row["key"]), "npy"), _clip(30))
    assert "expanded_prompt" not in worker._commit(_task("clip-2"), {"id": "clip-2"}, _clip(30), 0.1)
