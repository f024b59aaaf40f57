"""bench.e2e --runs: the medians it ends with."""

from __future__ import annotations

from bench.e2e import TARGET_MSG_S, TARGET_RCPT_S, Figures, summary


def figures(rate: float, ceiling: float, node_ms: float = 0.25) -> Figures:
    return Figures(
        ceiling=ceiling,
        rate=rate,
        send_rate=rate * 1.1,
        node_cpu_ms=node_ms,
        coordinator_cpu_ms=0.05,
        leader_rss_mib=95.0,
        node_rss_mib=75.0,
    )


def test_the_ratio_is_each_runs_own_then_its_median() -> None:
    # Ratios 20%, 50%, 20%: the median ratio is 20%, though the median rate over the
    # median ceiling would be 5,000 / 20,000 = 25%.
    runs = [figures(4000, 20_000), figures(5000, 10_000), figures(6000, 30_000)]
    lines = summary(runs, notice=False)
    assert lines[0] == "median (min-max) of 3 runs:"
    assert f"5,000 (4,000-6,000) msg/s; target {TARGET_MSG_S:,} msg/s" in lines[1]
    assert "ratio to smtp-source -> smtp-sink: 20.0% (20.0%-50.0%)" in lines[3]


def test_cpu_and_memory_are_medians_with_their_range() -> None:
    runs = [figures(5000, 20_000, node_ms=n) for n in (0.284, 0.243, 0.234, 0.256, 0.241)]
    text = "\n".join(summary(runs, notice=False))
    assert "CPU per message: nodes 0.243 (0.234-0.284) ms" in text
    assert "peak RSS: leader 95.0 (95.0-95.0) MiB" in text


def test_an_identical_body_job_is_counted_in_recipients() -> None:
    text = "\n".join(summary([figures(25_000, 20_000)], notice=True))
    assert f"25,000 (25,000-25,000) recipients/s; target {TARGET_RCPT_S:,} recipients/s" in text
    assert "CPU per recipient" in text
    assert "ratio" not in text  # recipients/s against smtp-source's msg/s means nothing
