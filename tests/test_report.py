"""report: the grid's shape, the per-variant numbers against the manifest, links on local disk and S3, errors."""

from __future__ import annotations

import urllib.request
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kandinsky_batch.cli import EXIT_USAGE, main
from kandinsky_batch.output.report import ReportError, variant_key, write_report
from kandinsky_batch.output.report_timings import device_of, gpus_of
from kandinsky_batch.output.storage import Storage
from tests.conftest import S3_BUCKET
from tests.sweep_output import cell_id, expected_stats, write_sweep


AXES = {"model": ["tiny", "tiny-b"], "num_inference_steps": [2, 4], "seed": [1, 2]}
PROMPTS = ["a cat", "a dog"]
BROKEN = {cell_id(0, {"model": "tiny-b", "num_inference_steps": 4, "seed": 2}): ("failed", "RuntimeError: boom <b>"),
          cell_id(1, {"model": "tiny", "num_inference_steps": 2, "seed": 1}): ("invalid", "height=65: not a multiple of 16")}
VOID = {"img", "br", "input", "meta", "link", "hr", "source"}


class Page(HTMLParser):
    """Every element of a page as {tag, attributes..., text}: enough to read a report without a browser."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, **{k: v or "" for k, v in attrs}, "text": ""}
        self.elements.append(element)
        if tag not in VOID:
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open and self._open.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def find(self, tag: str | None = None, cls: str | None = None, **attrs) -> list[dict]:
        return [e for e in self.elements if (tag is None or e["tag"] == tag)
                and (cls is None or cls in e.get("class", "").split())
                and all(e.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def table_values(page: Page) -> dict[str, dict]:
    """{variant: {field: data-value}} of the per-variant table."""
    found: dict[str, dict] = {}
    for cell in page.elements:
        if cell["tag"] == "td" and "data-field" in cell and "data-variant" in cell:
            found.setdefault(cell["data-variant"], {})[cell["data-field"]] = cell["data-value"]
    return found


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[str, Path]:
    """One written sweep for the module: the tests only read it (reports go beside it, rewritten by each)."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    uri = f"file://{tmp_path / 'out'}"
    write_sweep(uri, prompts=PROMPTS, axes=AXES, gangs={"tiny": "1", "tiny-b": "sp2xcfg2"},
                approximate={"tiny-b": True}, outcomes=BROKEN)
    return uri, tmp_path / "out"


def test_grid_has_a_row_per_prompt_and_seed_and_a_column_per_variant(sweep):
    uri, root = sweep
    index = write_report(uri)
    assert index == root / "report" / "index.html"
    page = Page(index)
    rows = page.find("tr", cls="grid-row")
    assert len(rows) == len(PROMPTS) * len(AXES["seed"])
    assert [r["data-row-index"] for r in rows] == ["0", "0", "1", "1"]
    cells = page.find("td", cls="cell")
    assert len(cells) == len(rows) * 4
    variants = [variant_key({"model": m, "num_inference_steps": s}) for m in AXES["model"]
                for s in AXES["num_inference_steps"]]
    assert [c["data-variant"] for c in cells[:4]] == variants
    # The prompt cell spans its seeds; the header names both column axes.
    assert [p["rowspan"] for p in page.find("th", cls="prompt")] == ["2", "2"]
    headers = [h["text"].split() for h in page.find("th", cls="axis")]
    assert headers == [["model", "tiny"], ["model", "tiny-b"]] + [["num_inference_steps", s] for s in "2424"]
    # Every ok cell plays its video; each has a poster copied next to the page.
    ok = page.find("div", cls="entry", data_status="ok")
    assert len(ok) == len(PROMPTS) * 8 - len(BROKEN)
    buttons = page.find("button", cls="poster")
    assert len(buttons) == len(ok)
    for image in page.find("img"):
        assert (index.parent / image["src"]).stat().st_size > 0
    for button in buttons:
        video = (index.parent / button["data-video"]).resolve()
        assert video.parent == root / "videos" and video.exists()


def test_variant_table_matches_the_manifest(sweep):
    uri, root = sweep
    page = Page(write_report(uri))
    want = expected_stats(root / "manifest", ["model", "num_inference_steps"])
    got = table_values(page)
    assert set(got) == set(want) and len(want) == 4
    for key, stats in want.items():
        for field, value in stats.items():
            if isinstance(value, str):
                assert got[key][field] == value, (key, field)
            else:
                assert float(got[key][field]) == pytest.approx(float(value), rel=1e-12), (key, field)
    tiny_b4 = variant_key({"model": "tiny-b", "num_inference_steps": 4})
    assert got[tiny_b4]["failed"] == "1" and got[tiny_b4]["approximate"] == "yes"
    # GPU-seconds weigh each video by its gang: sp2xcfg2 is 4 GPUs.
    assert float(got[tiny_b4]["gpu_s"]) == pytest.approx(4 * float(got[tiny_b4]["mean_s"]))
    # The chart has one bar per variant, as long as its mean.
    bars = page.find("g", data_variant=tiny_b4)
    assert len(bars) == 1 and float(bars[0]["data-value"]) == pytest.approx(want[tiny_b4]["mean_s"])


def test_failed_and_invalid_cells_show_status_and_error(sweep):
    uri, _ = sweep
    index = write_report(uri)
    page = Page(index)
    for rid, (status, error) in BROKEN.items():
        [entry] = page.find("div", cls="entry", data_id=rid)
        assert entry["data-status"] == status
        assert status in entry["text"] and error in entry["text"]
    assert "RuntimeError: boom &lt;b&gt;" in index.read_text()  # escaped, never markup
    assert page.find("p", id="tiny-notice")


def test_columns_flag_and_plain_jobs(sweep, tmp_path):
    uri, _ = sweep
    page = Page(write_report(uri, tmp_path / "by-model", columns=["model"]))
    assert len(page.find("tr", cls="grid-row")) == len(PROMPTS) * 2 * 2
    assert len({c["data-variant"] for c in page.find("td", cls="cell")}) == 2
    page = Page(write_report(uri, tmp_path / "one-column", columns=[]))
    assert {c["data-variant"] for c in page.find("td", cls="cell")} == {"{}"}

    plain = f"file://{tmp_path / 'plain'}"
    write_sweep(plain, prompts=["a", "b", "c"], axes=None)
    page = Page(write_report(plain, tmp_path / "plain-report"))
    assert len(page.find("tr", cls="grid-row")) == 3 and len(page.find("td", cls="cell")) == 3
    assert float(table_values(page)["{}"]["ok"]) == 3


def test_clear_errors(sweep, tmp_path):
    uri, _ = sweep
    with pytest.raises(ReportError, match=r"unknown axis 'steps' in --columns; .*model, num_inference_steps, seed"):
        write_report(uri, tmp_path / "r", columns=["steps"])
    with pytest.raises(ReportError, match="names an axis twice"):
        write_report(uri, tmp_path / "r", columns=["model", "model"])
    with pytest.raises(ReportError, match="--expires must be a positive"):
        write_report(uri, tmp_path / "r", expires=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="holds no manifest/ and no _SUCCESS: not a kandinsky-batch output"):
        write_report(f"file://{empty}")
    (empty / "manifest").mkdir()
    with pytest.raises(ReportError, match=f"manifest is missing: no manifest/.*under file://{empty}/manifest"):
        write_report(f"file://{empty}")


def test_cli(sweep, tmp_path, capsys):
    uri, _ = sweep
    assert main(["report", uri, "--out", str(tmp_path / "cli"), "--columns", "model,seed", "--copy-videos"]) == 0
    assert f"report: {tmp_path / 'cli' / 'index.html'}" in capsys.readouterr().out
    page = Page(tmp_path / "cli" / "index.html")
    for button in page.find("button", cls="poster"):
        assert button["data-video"].startswith("videos/") and (tmp_path / "cli" / button["data-video"]).exists()
    assert main(["report", uri, "--columns", "guidance_scale"]) == EXIT_USAGE
    assert "error: unknown axis 'guidance_scale' in --columns" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: report ") and "no such file or directory" in err, err


def test_local_links_from_another_directory_are_relative(sweep):
    uri, root = sweep
    out = root.parent / "elsewhere" / "deep"
    page = Page(write_report(uri, out))
    for button in page.find("button", cls="poster"):
        assert button["data-video"].startswith("../../out/videos/")
        assert (out / button["data-video"]).resolve().parent == root / "videos"


def test_object_store_signs_video_urls_and_copies_posters(s3_storage_options, tmp_path):
    uri = f"s3://{S3_BUCKET}/out-{uuid.uuid4().hex}"
    storage = write_sweep(uri, s3_storage_options, prompts=["a cat"], axes={"model": ["tiny"], "seed": [1, 2]})
    out = tmp_path / "report"
    page = Page(write_report(uri, out, storage_options=s3_storage_options, expires=600))
    endpoint = s3_storage_options["client_kwargs"]["endpoint_url"]
    buttons = page.find("button", cls="poster")
    assert len(buttons) == 2
    for button in buttons:
        url = button["data-video"]
        assert url.startswith(f"{endpoint}/{uri[len('s3://'):]}/videos/") and "X-Amz-Signature=" in url
        assert "X-Amz-Expires=600" in url
        rid = button["title"].split(":")[0]
        with urllib.request.urlopen(url, timeout=10) as response:  # the URL alone fetches the video
            assert response.read() == storage.get_bytes(f"videos/{rid}.mp4")
    images = page.find("img")
    assert len(images) == 2
    for image in images:
        assert (out / image["src"]).read_bytes() == storage.get_bytes(image["src"])
    with pytest.raises(ReportError, match="at most 604800 s"):
        write_report(uri, out, storage_options=s3_storage_options, expires=8 * 24 * 3600)


def test_signing_against_aws_gives_https_urls(tmp_path):
    """Without an endpoint override the signed URL is AWS's https one (signing is local: no request is made)."""
    from kandinsky_batch.output.report_assets import link, sigv4

    storage = Storage("s3://some-bucket/out", sigv4({"key": "AKIDEXAMPLE", "secret": "secret", "client_kwargs": {
        "region_name": "eu-west-1"}}))
    url = link(storage, tmp_path, "s3://some-bucket/out/videos/a.mp4", 3600)
    assert url.startswith("https://some-bucket.s3.") and "/out/videos/a.mp4?" in url
    assert "X-Amz-Expires=3600" in url and "X-Amz-Signature=" in url and "eu-west-1" in url


@pytest.mark.parametrize("gang, gpus", [("1", 1), ("sp2", 2), ("cfg2", 2), ("sp2xcfg2", 4), ("sp4(ring2)", 4),
                                        ("sp4(ring2)xcfg2", 8), (None, None), ("weird", None)])
def test_gpus_of_gang(gang, gpus):
    assert gpus_of(gang) == gpus


def test_non_tiny_models_get_no_notice(tmp_path):
    uri = f"file://{tmp_path / 'out'}"
    write_sweep(uri, prompts=["a"], axes={"model": ["kandinsky5lite_t2v_sft_5s"], "seed": [0]})
    assert not Page(write_report(uri)).find("p", id="tiny-notice")


def test_the_settings_every_cell_shares_are_shown_once_in_the_header(sweep):
    uri, _ = sweep
    page = Page(write_report(uri))
    assert len(page.find("dl", id="settings")) == 1
    items = [e for e in page.elements if "data-setting" in e]
    shown = dict(zip((e["data-setting"] for e in items), (d["data-value"] for d in page.find("dd"))))
    # write_sweep: guidance 5.0, 96x64, 12 frames at 8 fps, mp4, on CPU workers, for every cell; the sweep axes
    # (model, steps, seed) and the gang (1 for tiny, sp2xcfg2 for tiny-b) differ, and no row has a negative prompt.
    assert shown == {"guidance_scale": "5.0", "size": "96×64", "num_frames": "12", "fps": "8", "format": "mp4",
                     "device": "CPU"}
    assert [e["text"] for e in items] == ["guidance5.0", "size96×64", "frames12", "fps8", "formatmp4", "deviceCPU"]


def test_each_cell_names_its_row_id_on_hover_and_in_its_detail(sweep):
    uri, _ = sweep
    page = Page(write_report(uri))
    cells = page.find("td", cls="cell")
    assert cells and all(c["title"] for c in cells)
    entries = page.find("div", cls="entry")
    assert len(entries) == len(cells)  # one manifest row per cell here
    ids = {e["data-id"] for e in entries}
    assert {c["title"] for c in cells} == ids
    shown = page.find("div", cls="rid")
    assert sorted(e["text"] for e in shown) == sorted(ids) and all(e["title"] == e["text"] for e in shown)
    for rid in BROKEN:  # failed and invalid cells name theirs too
        [entry] = page.find("div", cls="entry", data_id=rid)
        assert rid in entry["text"]


@pytest.mark.parametrize("worker, unit", [("replica0@host:1:cpu", "CPU·s"), ("sp2/replica1@host:7:gpu0", "GPU·s"),
                                          ("replica0@host:1:cuda:0", "GPU·s"), ("replica0@host:1:mps", "rank·s")])
def test_seconds_per_video_are_gpu_seconds_only_on_gpus(tmp_path, worker, unit):
    uri = f"file://{tmp_path / 'out'}"
    write_sweep(uri, prompts=["a"], axes={"model": ["tiny"], "seed": [0, 1]}, worker=worker)
    index = write_report(uri)
    page = Page(index)
    [header] = [h for h in page.find("th") if "data-unit" in h]
    assert header["data-unit"] == unit and header["text"] == f"{unit} / video"
    if unit != "GPU·s":
        assert "GPU·s" not in index.read_text(encoding="utf-8")


@pytest.mark.parametrize("worker, device", [("replica0@host:1:cpu", "CPU"), ("g/replica2@node-a:9:gpu3", "GPU"),
                                            ("replica0@host:1:gpu0,1", "GPU"), ("replica0@host:1:cuda", "GPU"),
                                            ("replica0@host:1:mps", None), (None, None), ("", None)])
def test_device_of_worker(worker, device):
    assert device_of(worker) == device
