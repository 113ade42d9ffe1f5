"""The fault suite: a real `modelshelf run` process with its real embedded MLServer, clients
that check every answer, and faults injected from outside (signals, direct server calls, a
full filesystem, flipped bits). Helpers:

- `store`: two sklearn models `a` and `b` that predict differently on ROWS (so an answer from
  the wrong model is caught), with their expected predictions;
- `start_agent(models, *args, env=)`: an agent on a ConfigMap-style dir, stopped afterwards;
- `Traffic`: client threads, each bound to one model, that record every answer: ok, wrong
  (200 with another model's predictions, or the wrong model name) or failed (code, Retry-After).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.support.agentproc import AgentProcess
from tests.support.configmap import ConfigMapDir
from tests.support.models import sample_rows, sklearn_predictions, v2_request, write_sklearn_model

ROWS = sample_rows(12, seed=3)


@dataclass(frozen=True)
class Store:
    root: Path
    expected: dict[str, list[int]]  # model dir name -> its predictions for ROWS

    def entry(self, name: str, model: str | None = None, **extra: object) -> dict:
        return {"name": name, "uri": str(self.root / (model or name)), **extra}


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("fault-store")
    expected = {}
    for name, kind, seed in (("a", "tree", 1), ("b", "iris-logreg", 2)):
        write_sklearn_model(root / name, kind=kind, seed=seed)
        expected[name] = sklearn_predictions(root / name, ROWS)
    assert expected["a"] != expected["b"], "the two models must disagree on ROWS"
    return Store(root, expected)


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator:
    cm = ConfigMapDir(tmp_path / "config")
    procs: list[AgentProcess] = []

    def start(models: list[dict], *args: str, env: dict[str, str] | None = None, cache: Path | None = None,
              wait: bool = True) -> AgentProcess:
        cm.write({"models.yaml": json.dumps({"models": models})})
        p = AgentProcess(cm.root, cache or tmp_path / "cache", tmp_path / f"agent{len(procs)}.log",
                         "--min-residency", "0", *args, env=env)
        procs.append(p)
        return p.wait_ready() if wait else p

    yield start
    for p in procs:
        p.stop()


@dataclass
class Answer:
    model: str
    code: int
    retry_after: str | None
    ok: bool  # 200 with this model's predictions
    text: str


def sklearn_answer(expected: list[int], doc: dict) -> bool:
    """True when `doc` (a V2 response) holds exactly these sklearn predictions."""
    outs = [o for o in doc.get("outputs", []) if o.get("name") == "predict"]
    return len(outs) == 1 and [int(v) for v in outs[0]["data"]] == expected


@dataclass
class Traffic:
    """Client threads against `url`, `per_model` per model, each checking its answers: by
    default sklearn predictions for ROWS; `body` and `check(expected, doc)` serve other models."""

    url: str
    expected: dict[str, Any]  # served name -> what its answer must hold (predictions)
    per_model: int = 2
    body: dict = field(default_factory=lambda: v2_request(ROWS))
    check: Callable[[Any, dict], bool] = sklearn_answer
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> "Traffic":
        for name in self.expected:
            for i in range(self.per_model):
                t = threading.Thread(target=self._client, args=(name,), name=f"client-{name}-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _client(self, name: str) -> None:
        body = self.body
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(f"/v2/models/{name}/infer", json=body)
                except httpx.HTTPError as e:  # the agent itself must always answer
                    self._add(Answer(name, 0, None, False, f"{type(e).__name__}: {e}"))
                    time.sleep(0.05)
                    continue
                ok = False
                if r.status_code == 200:
                    doc = r.json()
                    ok = doc.get("model_name") == name and self.check(self.expected[name], doc)
                self._add(Answer(name, r.status_code, r.headers.get("retry-after"), ok, r.text[:200]))
                if r.status_code != 200:
                    time.sleep(0.02)  # a failing client does not spin

    def _add(self, a: Answer) -> None:
        with self._lock:
            self.answers.append(a)

    # -- what was seen -----------------------------------------------------------------

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def wrong(self) -> list[Answer]:
        """200 answers that are not this model's: never acceptable."""
        return [a for a in self.snapshot() if a.code == 200 and not a.ok]

    def failed(self) -> list[Answer]:
        return [a for a in self.snapshot() if a.code != 200]

    def bad_failures(self) -> list[Answer]:
        """Failures other than 503 with a Retry-After header (the only acceptable kind)."""
        return [a for a in self.failed() if not (a.code == 503 and a.retry_after)]

    def ok_count(self, since: int = 0) -> int:
        return sum(1 for a in self.snapshot()[since:] if a.ok)

    def summary(self) -> str:
        answers = self.snapshot()
        by: dict[tuple[int, bool], int] = {}
        for a in answers:
            by[(a.code, bool(a.retry_after))] = by.get((a.code, bool(a.retry_after)), 0) + 1
        samples = {f"{a.code}": a.text for a in answers if a.code != 200}
        return f"{len(answers)} answers; (code, retry-after) counts {by}; samples {samples}"

    def wait_ok(self, n: int, timeout: float, since: int = 0) -> None:
        """Wait until `n` correct answers per model arrived after answer number `since`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answers = self.snapshot()[since:]
            if all(sum(1 for a in answers if a.model == m and a.ok) >= n for m in self.expected):
                return
            time.sleep(0.05)
        raise AssertionError(f"models did not all serve again within {timeout}s: {self.summary()}")


def served(agent: AgentProcess) -> dict[str, dict]:
    return agent.status()["models"]


def infer(agent: AgentProcess, name: str) -> httpx.Response:
    return httpx.post(f"{agent.url}/v2/models/{name}/infer", json=v2_request(ROWS), timeout=30, trust_env=False)
