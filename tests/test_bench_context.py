"""``sloth bench train --max-context``: the search (doubling, then bisection) against a fake
``fits``, the prober's failure handling and re-probes, and one real run of the tiny shape
on the CPU."""

from __future__ import annotations

import json

import pytest

from sloth_core.bench import context
from sloth_core.bench.context import ProbeError, Prober, max_fitting
from sloth_core.cli import main


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    # The bench's machinery on the CPU, not the kernels: under CI's TRITON_INTERPRET=1 they
    # would run interpreted (minutes); the kernels are tested against the references.
    monkeypatch.setenv("SLOTH_KERNELS", "torch")


def upto(limit: int):
    return lambda seq: seq <= limit


def test_doubles_then_bisects_to_the_granularity():
    search = max_fitting(upto(5000), start=1024, cap=65536, granularity=256)
    assert search.best == 4864  # the longest multiple of 256 within 5000
    seqs = [seq for seq, _ in search.probes]
    assert seqs[:4] == [1024, 2048, 4096, 8192]  # doubling until one does not fit
    assert all(4096 < seq < 8192 and seq % 256 == 0 for seq in seqs[4:])  # then bisection
    assert search.probes[3] == (8192, False)
    assert len(seqs) == len(set(seqs)) == 8


@pytest.mark.parametrize("limit", [1024, 1025, 1300, 2047, 2048, 3000, 40000, 65535])
def test_finds_the_limit_within_one_granule(limit):
    search = max_fitting(upto(limit), start=1024, cap=65536, granularity=256)
    assert search.best <= limit < search.best + 256
    assert all(ok == (seq <= limit) for seq, ok in search.probes)


def test_nothing_fits():
    search = max_fitting(upto(100), start=1024, cap=65536)
    assert search.best == 0 and search.probes == [(1024, False)]


def test_everything_up_to_the_cap_fits():
    search = max_fitting(upto(10**9), start=1024, cap=10000, granularity=256)
    assert search.best == 10000
    assert [seq for seq, _ in search.probes] == [1024, 2048, 4096, 8192, 10000]
    assert max_fitting(upto(10**9), start=512, cap=512).probes == [(512, True)]


def test_the_cap_itself_can_be_the_first_miss():
    search = max_fitting(upto(9000), start=1024, cap=10000, granularity=256)
    assert search.best == 8960 and (10000, False) in search.probes


def test_rejects_a_start_past_the_cap():
    with pytest.raises(ValueError, match="start"):
        max_fitting(upto(1), start=2048, cap=1024)
    with pytest.raises(ValueError, match="granularity"):
        max_fitting(upto(1), start=1, cap=2, granularity=0)


def test_errors_propagate_out_of_the_search():
    def fits(seq):
        raise ProbeError("boom")

    with pytest.raises(ProbeError, match="boom"):
        max_fitting(fits, start=16, cap=64)


class FakeWorker:
    """Stands for a probe process: answers from ``script`` (one list per process started)."""

    started: list[FakeWorker] = []
    script: list[list[dict]] = []

    def __init__(self, args, env=None):
        self.args, self.env, self.probes, self.closed = args, env, 0, False
        self.answers = iter(FakeWorker.script.pop(0))
        FakeWorker.started.append(self)

    def probe(self, seq, timeout):
        out = next(self.answers)
        self.probes += "fits" in out
        return {"seq": seq, **out}

    def close(self):
        self.closed = True


@pytest.fixture
def fake_worker(monkeypatch):
    monkeypatch.setattr(context, "_Worker", FakeWorker)
    FakeWorker.started, FakeWorker.script = [], []
    return FakeWorker


def _prober():
    return Prober("sloth", "m", device="cpu", quantization=None, budget_gib=None, timeout=10)


def test_a_probe_that_fails_is_an_error_unless_it_ran_out_of_memory(fake_worker):
    fake_worker.script = [
        [{"fits": False, "reason": "out of memory: ..."}],  # a fresh process: it stands
        [{"error": "Killed", "returncode": -9}],  # the host's OOM killer
        [{"error": "ValueError: a bug", "returncode": 1}],
    ]
    prober = _prober()
    assert prober(64)["fits"] is False
    prober.close()
    killed = prober(64)
    assert killed["fits"] is False and "signal 9" in killed["reason"]
    with pytest.raises(ProbeError, match="a bug"):
        prober(64)
    assert prober.processes == 3 and all(w.closed for w in fake_worker.started)


def test_probes_share_a_process_and_a_failure_after_others_is_reprobed_fresh(fake_worker):
    fake_worker.script = [
        [{"fits": True}, {"fits": True}, {"fits": False, "reason": "out of memory"}],
        # The fresh process overrules the one that ran earlier probes, then serves on.
        [{"fits": True}, {"fits": False, "reason": "out of memory"}],
        # A failure confirmed fresh stands.
        [{"fits": False, "reason": "out of memory"}, {"fits": True}],
    ]
    prober = _prober()
    assert [prober(n)["fits"] for n in (16, 32)] == [True, True]
    third = prober(64)
    assert third["fits"] is True and third["reprobed"]
    fourth = prober(128)
    assert fourth["fits"] is False and fourth["reprobed"]
    assert prober(96)["fits"] is True
    prober.close()
    assert prober.processes == 3 and all(w.closed for w in fake_worker.started)


def test_run_max_context_per_system_with_ratios_and_skips(monkeypatch, tmp_path):
    limits = {"sloth": 3000, "hf": 1000}

    class FakeProber:
        def __init__(self, system, model_dir, **kwargs):
            self.system, self.processes = system, 1

        def __call__(self, seq, deadline=None):
            if self.system == "sloth:off":
                raise ProbeError("crashed")
            return {"seq": seq, "fits": seq <= limits[self.system], "peak_gib": seq / 1000}

        def close(self):
            pass

    monkeypatch.setattr(context, "Prober", FakeProber)
    monkeypatch.setattr(context, "make_model", lambda shape, path, device: path)
    monkeypatch.setattr(
        context,
        "resolve_systems",
        lambda systems: (
            ["sloth", "hf", "sloth:off"],
            [{"system": "liger", "skipped": "not installed"}],
        ),
    )
    report = context.run_max_context("llama-tiny", systems="all", model_dir=tmp_path,
                                     device="cpu", start=256, cap=4096,
                                     granularity=128)  # fmt: skip
    by = {r["system"]: r for r in report["results"]}
    assert by["sloth"]["max_seq"] == 2944 and by["hf"]["max_seq"] == 896
    assert by["sloth"]["context_vs_hf"] == pytest.approx(2944 / 896)
    assert by["sloth:off"]["error"] == "crashed" and "max_seq" not in by["sloth:off"]
    assert by["liger"]["skipped"] == "not installed"
    text = context.markdown(report, "sloth bench train --max-context")
    assert "| sloth | 2944 | 3.29x | 2.94 |" in text and "skipped: not installed" in text


def test_cli_max_context_on_the_cpu(tmp_path):
    # One real probe process for both lengths: 32 fits, 64 (the cap) fits.
    args = ["bench", "train", "--shape", "llama-tiny", "--max-context", "--systems", "sloth",
            "--device", "cpu", "--context-start", "32", "--context-cap", "64",
            "--context-granularity", "16", "--model-dir", str(tmp_path / "m"),
            "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kind"] == "max_context" and report["budget_measure"] == "peak RSS growth"
    assert report["device_name"] == "cpu"  # a card's name on CUDA: the table names it
    (result,) = report["results"]
    assert result["system"] == "sloth" and result["max_seq"] == 64 and result["capped"]
    assert [p["seq"] for p in result["probes"]] == [32, 64] and result["processes"] == 1
    assert all(p["fits"] and p["loss"] > 0 for p in result["probes"])
    text = (tmp_path / "r.md").read_text()
    assert "| sloth | 64 (cap) |" in text and "budget none (a probe fits if it runs)" in text


def test_cli_max_context_over_a_budget_on_the_cpu(tmp_path):
    # A real probe process whose first step already passes the budget (1 KiB; the RSS
    # growth of loading the model and one step is more): nothing fits, the reason says
    # by how much.
    args = ["bench", "train", "--shape", "llama-tiny", "--max-context", "--systems", "sloth",
            "--device", "cpu", "--context-start", "32", "--context-cap", "64",
            "--memory-budget-gib", "0.000001", "--model-dir", str(tmp_path / "m"),
            "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert main(args) == 0
    (result,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert result["max_seq"] == 0 and result["processes"] == 1
    (probe,) = result["probes"]
    assert probe["fits"] is False and probe["peak_gib"] > 0.000001
    assert "over the budget of 0.00 GiB" in probe["reason"]


class _Limited:
    """A prober of systems with known limits that runs out of time after ``budget``
    probes (what the run's time limit does to a real one), counting the lengths probed."""

    limits = {"sloth": 5000, "hf": 1300}

    def __init__(self, budget=None):
        self.budget, self.asked = budget, []

    def __call__(self, system, model_dir, **kwargs):
        outer = self

        class Probe:
            processes = 1

            def __call__(self, seq, deadline=None):
                if outer.budget is not None and len(outer.asked) >= outer.budget:
                    raise context.SearchIncomplete(f"the time limit came before {seq}")
                outer.asked.append((system, seq))
                return {"seq": seq, "fits": seq <= outer.limits[system], "peak_gib": 1.0}

            def close(self):
                pass

        return Probe()


def _search(monkeypatch, tmp_path, prober, **kwargs):
    monkeypatch.setattr(context, "Prober", prober)
    monkeypatch.setattr(context, "make_model", lambda shape, path, device: path)
    monkeypatch.setattr(context, "resolve_systems", lambda systems: (["hf", "sloth"], []))
    report = context.run_max_context("llama-tiny", systems="all", model_dir=tmp_path,
                                     device="cpu", start=256, cap=8192, granularity=128,
                                     **kwargs)  # fmt: skip
    return {r["system"]: r for r in report["results"]}


def test_a_search_cut_by_the_time_limit_goes_on_from_its_journal(monkeypatch, tmp_path):
    whole = _Limited()
    want = _search(monkeypatch, tmp_path, whole)
    assert want["sloth"]["max_seq"] == 4992 and want["hf"]["max_seq"] == 1280

    journal = tmp_path / "probes.jsonl"
    first = _Limited(budget=6)  # hf's search takes 7: 256 512 1024 2048 1536 1280 1408
    cut = _search(monkeypatch, tmp_path, first, journal=journal, time_limit_s=60)
    assert cut["hf"]["incomplete"] and "max_seq" not in cut["hf"]
    assert cut["hf"]["bounds"] == [1280, 1536] and "probes.jsonl" in cut["hf"]["error"]
    assert cut["sloth"]["incomplete"] and cut["sloth"]["bounds"] == [0, None]
    assert len(journal.read_text().splitlines()) == 6

    second = _Limited()
    done = _search(monkeypatch, tmp_path, second, journal=journal)
    assert done["hf"]["max_seq"] == 1280 and done["sloth"]["max_seq"] == 4992
    assert done["sloth"]["context_vs_hf"] == pytest.approx(4992 / 1280)
    # Nothing probed twice: the journal's answers stood in for the first run's probes.
    assert not set(second.asked) & set(first.asked)
    assert sorted(first.asked + second.asked) == sorted(whole.asked)
    assert [p.get("journal", False) for p in done["hf"]["probes"]] == [True] * 6 + [False]


def test_a_journal_holds_only_for_the_same_search(monkeypatch, tmp_path):
    journal = tmp_path / "probes.jsonl"
    _search(monkeypatch, tmp_path, _Limited(), journal=journal)
    lines = journal.read_text().splitlines()
    # Another budget is another search: nothing reused, every length probed again.
    again = _Limited()
    _search(monkeypatch, tmp_path, again, journal=journal, budget_gib=2.0)
    assert len(again.asked) == len(lines)
    # A line cut short (a process killed while writing) is skipped with a warning naming
    # the file and line; the other answers stand.
    journal.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40] + "\n")
    rest = _Limited()
    with pytest.warns(UserWarning, match=r"probes.jsonl:4: not a probe's answer"):
        _search(monkeypatch, tmp_path, rest, journal=journal)
    assert len(rest.asked) == len(lines) - 3


def test_the_prober_stops_at_the_deadline_not_only_at_its_timeout(fake_worker, monkeypatch):
    import time

    class Slow(FakeWorker):
        def probe(self, seq, timeout):
            self.timeouts = getattr(self, "timeouts", []) + [timeout]
            raise context.ProbeTimeout(f"a probe of {seq} tokens took over {timeout:g} s")

    monkeypatch.setattr(context, "_Worker", Slow)
    prober = _prober()  # its own timeout: 10 s
    with pytest.raises(context.SearchIncomplete, match="before the probe of 64"):
        prober(64, deadline=time.monotonic() - 1)
    assert fake_worker.started == []  # no process started past the deadline
    fake_worker.script = [[], []]
    with pytest.raises(context.SearchIncomplete, match="during the probe of 64"):
        prober(64, deadline=time.monotonic() + 2)
    assert fake_worker.started[-1].timeouts[0] <= 2 and fake_worker.started[-1].closed
    with pytest.raises(ProbeError, match="took over 10 s"):  # the probe's own limit
        prober(64, deadline=time.monotonic() + 100)


def test_cli_max_context_takes_its_journal_answers_without_a_process(tmp_path, capsys):
    journal = tmp_path / "j" / "probes.jsonl"
    args = ["bench", "train", "--shape", "llama-tiny", "--max-context", "--systems", "sloth",
            "--device", "cpu", "--context-start", "32", "--context-cap", "64",
            "--model-dir", str(tmp_path / "m"), "--journal", str(journal),
            "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert main(args) == 0
    first = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert first["processes"] == 1 and len(journal.read_text().splitlines()) == 2
    assert "sloth: 32 tokens: fits" in capsys.readouterr().err  # each probe as it comes
    (tmp_path / "r.json").unlink()
    assert main(args) == 0
    again = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert again["max_seq"] == first["max_seq"] == 64 and again["processes"] == 0
    assert all(p["journal"] for p in again["probes"])
    err = capsys.readouterr().err
    assert "sloth: 64 tokens: fits, peak" in err and "(journal)" in err


def test_a_system_with_a_setting_probes_in_a_process_with_it(fake_worker):
    fake_worker.script = [[{"fits": True}]]
    prober = Prober("sloth[SLOTH_KEEP_PROJECTIONS=1]", "m", device="cpu", quantization=None,
                    budget_gib=None, timeout=10)  # fmt: skip
    assert prober(64)["fits"] is True
    (worker,) = fake_worker.started
    assert worker.args[0] == "sloth" and worker.env == {"SLOTH_KEEP_PROJECTIONS": "1"}
