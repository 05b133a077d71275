"""The live demo: generates from a mini run, serves on 127.0.0.1 by default, never shares publicly."""

import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable

import pytest
from ports import free_port

from nitrofusion.cli import main

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls
gradio = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("app") / "run"
    assert main(["distill", "--preset", "tiny", "--out", str(run)]) == 0
    return run


def test_app_generates_deterministically_and_binds_to_localhost(mini_run):
    from nitrofusion.app.live import build_app, launch, make_generator

    fn, examples = make_generator(mini_run)
    a, b, c = fn(examples[0], 1, 3), fn(examples[0], 1, 3), fn(examples[0], 4, 3)
    assert a.size == (256, 256) and a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    demo = build_app(fn, examples)
    launch(demo, port=free_port(), block=False)
    try:
        assert demo.server_name == "127.0.0.1" and not demo.share
        with urllib.request.urlopen(demo.local_url, timeout=30) as page:
            assert page.status == 200
        from gradio_client import Client

        client = Client(demo.local_url, verbose=False)
        api = client.view_api(print_info=False, return_format="dict")
        assert list(api["named_endpoints"]) == ["/generate"]
        for args, message in ((("a photo of a bag", 7, 0), "steps must be a whole number from 1 to 4"),
                              (("a photo of a bag", 1, 2**70), "seed must be a whole number"),
                              (("  ", 1, 0), "type a prompt")):
            with pytest.raises(Exception, match=message):  # a message on the page, not a server traceback
                client.predict(*args, api_name="/generate")
    finally:
        demo.close()


def test_app_cli_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    assert main(["app", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_app_cli_refuses_a_taken_port_in_one_line(mini_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["app", "--model", str(mini_run), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot serve on 127.0.0.1:{port}" in err[0] and "--port" in err[0], err


def _serve(mini_run, wrap: Callable | None = None, **options):
    from nitrofusion.app.live import build_app, launch, make_generator

    fn, examples = make_generator(mini_run)
    demo = build_app(wrap(fn) if wrap else fn, examples, **options)
    launch(demo, port=free_port(), block=False)
    return demo


# (prompt, steps, seed) through the API, and the one-line error each must get (None: an image)
ABUSE = [("x" * 10_000, 1, 0, "the prompt is 10,000 characters, over the limit of 1,000: shorten it"),
         ("\x00\x1b[31m\r\n", 1, 0, None), ("🐱 a cat in a hat 👩‍👩‍👧", 2, 5, None),
         ("", 1, 0, "the prompt is empty: type a prompt"), (None, 1, 0, "the prompt is empty: type a prompt"),
         ("a photo of a bag", 7, 0, "steps must be a whole number from 1 to 4 (got 7)"),
         ("a photo of a bag", "two", 0, "steps must be a whole number from 1 to 4 (got 'two')"),
         ("a photo of a bag", 1.5, 0, "steps must be a whole number from 1 to 4 (got 1.5)"),
         ("a photo of a bag", 1, -1, "seed must be a whole number from 0 to 2**63 - 2**32 (got -1)"),
         ("a photo of a bag", 1, 1e300, "seed must be a whole number from 0 to 2**63 - 2**32 (got 1e+300)")]


def _ask(url: str, args: tuple, start: threading.Barrier) -> tuple[bool, object]:
    """One API client: (True, (image path, info)) or (False, its error's message)."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    start.wait(timeout=60)  # all clients connected: their requests reach the queue together
    try:
        return True, client.predict(*args, api_name="/generate")
    except Exception as e:  # gradio_client's AppError / QueueError: the message the server sent
        return False, str(e)


def _assert_image(result: tuple[str, str], prompt: str) -> None:
    from PIL import Image

    path, info = result
    assert Image.open(path).size == (256, 256) and len(info.splitlines()) == 1 and f"“{prompt}”" in info, info


def test_twenty_api_clients_at_once_with_abusive_inputs_each_get_an_image_or_one_line(mini_run, capfd):
    """20 gradio_client clients send at once: 10 normal requests and 10 abusive ones (a 10,000-character prompt,
    control characters, emoji, empty, steps / seed out of range or not numbers). Each gets its image or a one-line
    error naming the problem; the server prints no traceback and serves a normal request afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    demo = _serve(mini_run)
    try:
        classes = ["bag", "coat", "dress", "sandal", "sneaker"] * 2
        requests = [(f"a photo of a {c}", 1 + i % 4, i, None) for i, c in enumerate(classes)] + ABUSE
        start = threading.Barrier(len(requests))
        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(lambda r: _ask(demo.local_url, r[:3], start), requests))
        for (prompt, _, _, error), (ok, value) in zip(requests, results, strict=True):
            if error is None:  # control characters are drawn (and echoed) as spaces
                assert ok, (prompt, value)
                _assert_image(value, " ".join(prompt.replace("\x00", " ").replace("\x1b", " ").split()))
            else:
                assert not ok and value == error, (prompt, value)
        ok, value = _ask(demo.local_url, ("a photo of a coat", 1, 99), threading.Barrier(1))
        assert ok, value
        _assert_image(value, "a photo of a coat")
    finally:
        demo.close()
    assert "Traceback" not in capfd.readouterr().err


def test_a_full_queue_refuses_in_one_line_and_the_server_goes_on(mini_run):
    """gradio's queue bound: with the worker held on one image and max_queue=2 waiting, the other requests get
    gradio's one-line "queue is full" at once instead of a longer queue; then every accepted one is drawn."""
    from gradio_client import Client

    gate = threading.Event()

    def held(fn):  # the real generator, started only when the test says (a slow image, on demand)
        def draw(*args):
            gate.wait(60)
            return fn(*args)

        return draw

    demo = _serve(mini_run, wrap=held, max_queue=2)
    try:
        client = Client(demo.local_url, verbose=False)
        jobs = [client.submit("a photo of a bag", 1, seed, api_name="/generate") for seed in range(6)]
        # at most 3 are accepted (1 drawing + 2 waiting) and none can finish while held: the first 3 done are refused
        deadline = time.monotonic() + 60
        while sum(j.done() for j in jobs) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        gate.set()
        drawn, refused = 0, 0
        for job in jobs:
            try:
                result = job.result(timeout=60)
            except Exception as e:  # gradio_client's QueueError
                assert str(e) == "Queue is full! Please try again.", e
                refused += 1
                continue
            _assert_image(result, "a photo of a bag")
            drawn += 1
        assert drawn >= 1 and refused >= 3
        _assert_image(client.predict("a photo of a coat", 1, 0, api_name="/generate"), "a photo of a coat")
    finally:
        gate.set()
        demo.close()


@pytest.mark.skipif(__import__("nitrofusion.app.browser", fromlist=["find_browser"]).find_browser() is None,
                    reason="needs chromium and chromium-driver (scripts/install.sh installs them)")
def test_the_app_draws_as_a_visitor_types_in_two_browser_tabs(mini_run, tmp_path):
    """Headless Chromium types key by key, no click and no Enter: the live mode makes the image of the whole
    prompt and shows its latency; two tabs typing at once are both served (one queue, each tab's latest) while 20
    API clients load the same queue. A pasted over-long prompt gets a one-line error on the page, and the next
    prompt an image."""
    from concurrent.futures import ThreadPoolExecutor

    from nitrofusion.app.browser import open_browser, paste_and_generate, screenshot, type_and_wait

    demo = _serve(mini_run)
    drivers = []
    try:
        drivers = [open_browser(), open_browser()]
        prompts = ["a photo of a sandal", "a photo of a bag"]
        results: dict[int, dict] = {}

        def visit(i):
            results[i] = type_and_wait(drivers[i], demo.local_url, prompts[i], keystroke_pause=0.02)

        threads = [threading.Thread(target=visit, args=(i,)) for i in range(2)]
        start = threading.Barrier(20)
        with ThreadPoolExecutor(20) as pool:  # the load: 20 API clients, each with a request in the queue
            load = [pool.submit(_ask, demo.local_url, ("a photo of a shirt", 1, i), start) for i in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert all(job.result()[0] for job in load)
        assert sorted(results) == [0, 1]
        for i, p in enumerate(prompts):
            assert f"“{p}”: 1 step(s), seed 0" in results[i]["latency_text"] and " ms" in results[i]["latency_text"]
        shot = screenshot(drivers[0], tmp_path / "app.png")
        assert shot.stat().st_size > 10_000
        # a pasted 10,000-character prompt (past the box's maxlength): a one-line error on the page, then an image
        assert paste_and_generate(drivers[1], "x" * 10_000) == ("the prompt is 10,000 characters, over the limit "
                                                               "of 1,000: shorten it")
        assert paste_and_generate(drivers[1], "a photo of a coat").startswith("“a photo of a coat”: 1 step(s)")
    finally:
        for d in drivers:
            d.quit()
        demo.close()
