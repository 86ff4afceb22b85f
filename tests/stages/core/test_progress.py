from stages.core.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_logs_at_interval_with_eta_and_last_line():
    clock, lines = FakeClock(), []
    progress = Progress("diffgap clap seed 1", 100, "steps", log=lines.append, interval=10, clock=clock).start()
    for _ in range(100):
        clock.now += 1.0
        progress.advance(loss=0.5)
    # first line, one every 10 s of 100 s, and the last one
    assert lines[0].startswith("diffgap clap seed 1: 0/100 steps (0%)")
    assert 10 <= len(lines) <= 12
    assert "ETA" in lines[1] and "loss 0.5" in lines[1]
    assert lines[-1].startswith("diffgap clap seed 1: 100/100 steps (100%)") and "done in 1 min 40 s" in lines[-1]


def test_eta_from_mean_rate():
    clock = FakeClock()
    progress = Progress("mel", 10, "shards", clock=clock)
    assert progress.eta_seconds() is None
    clock.now = 4.0
    progress.advance(2)
    assert progress.eta_seconds() == 16.0
    assert "s per shard" in progress.line()


def test_format_duration():
    assert format_duration(42) == "42 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(7620) == "2 h 07 min"
