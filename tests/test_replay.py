"""Replay as DreamerV3 does it (docs/design.md#replay): steps stored as they arrive in fixed-size
chunks, windows drawn uniformly over stored steps across episode boundaries, the running
episode trainable after one chunk, reservoir exact for any episode length, the LLCD
context steps before a window, and the on-disk mirror.

Expected frequencies are derived from the stream each test builds (step indices and
episode positions), never from the replay's own bookkeeping."""

import os
import pathlib
import sys

import numpy as np
import pytest
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tools  # noqa: E402


def add_stream(replay, lengths, env_index=0, first_step=0, task=0):
    """Offer episodes of the given lengths to env ``env_index``'s stream. Each step carries its
    global index ``step``, its position ``t`` in its episode and its episode number ``ep``.
    Returns the index after the last step."""
    step = first_step
    for number, length in enumerate(lengths):
        for t in range(length):
            replay.add_step(env_index, {
                "step": np.int64(step), "t": np.int64(t), "ep": np.int64(number), "env": np.int64(env_index),
                "task_id": np.int32(task), "is_first": t == 0, "reward": np.float32(t),
                "action": np.full(2, step, np.float32)})
            step += 1
    return step


def files_on_disk(directory):
    return sorted(path.stem for path in pathlib.Path(directory).glob("*.npz"))


def sample_many(replay, count, length, prefix=0, batch=500):
    parts = [replay.sample(batch, length, prefix) for _ in range(count // batch)]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


# ----------------------------------------------------------------- windows


def test_window_starts_are_uniform_over_positions_within_episodes():
    """501-step episodes, 64-step windows: every position in an episode, the first and last
    63 included, starts windows as often as the stream offers it (chi-square, p > 0.01)."""
    episode, length = 501, 64
    replay = tools.Replay(None, capacity=10 ** 6, seed=0, chunk=64)
    total = add_stream(replay, [episode] * 20)
    stored = total // 64 * 64  # the last partial chunk is still open
    starts = np.arange(stored)  # every stored step starts one window
    expected = np.bincount(starts % episode, minlength=episode).astype(float)
    batch = sample_many(replay, 60_000, length)
    observed = np.bincount(batch["t"][:, 0], minlength=episode)
    expected *= observed.sum() / expected.sum()
    assert stats.chisquare(observed, expected).pvalue > 0.01
    assert observed[:63].sum() > 0.9 * expected[:63].sum() and observed[-63:].sum() > 0.9 * expected[-63:].sum()
    # windows are consecutive stream steps and cross episode boundaries, is_first marking them;
    # past the last stored step a window wraps round to the first, is_first marking that too
    diffs = np.diff(batch["step"], axis=1)
    wrapped = diffs != 1
    assert np.all(diffs[wrapped] == -(stored - 1)) and 0 < wrapped.any(1).mean() < 0.01
    assert np.all(batch["is_first"][:, 1:] == ((batch["t"][:, 1:] == 0) | wrapped))
    crossing = batch["is_first"][:, 1:].any(1)
    assert 0.05 < crossing.mean() < 0.25  # about 63 of 501 starts


def test_windows_never_mix_two_envs_and_each_stream_is_sampled():
    replay = tools.Replay(None, capacity=10 ** 6, seed=1, chunk=16)
    ends = [0, 0]
    for _ in range(5):  # interleaved arrival, as the driver adds steps
        for env in (0, 1):
            ends[env] = add_stream(replay, [40], env_index=env, first_step=ends[env])
    batch = replay.sample(2000, 16)
    assert np.all(batch["env"] == batch["env"][:, :1])
    assert np.all((np.diff(batch["action"][..., 0], axis=1) == 1) | batch["is_first"][:, 1:])
    assert set(batch["env"][:, 0].tolist()) == {0, 1}


def one_step_per_window(batch, seed=0):
    """One uniformly chosen step of each sampled window: independent draws whose distribution
    is the windows' coverage of the stored steps."""
    steps = batch["step"]
    return steps[np.arange(len(steps)), np.random.default_rng(seed).integers(0, steps.shape[1], len(steps))]


def test_every_stored_step_is_trained_alike_after_heavy_eviction():
    """Reservoir of 40 of 2000 offered 64-step chunks, so that most stored chunks have no
    stored neighbour: a step's chance to be in a 32-step window is the same at every position
    of its chunk, the edges included, and for every stored step (chi-square, p > 0.01)."""
    chunk, length = 64, 32
    replay = tools.Replay(None, 40 * chunk, seed=8, policy="reservoir", chunk=chunk)
    add_stream(replay, [1000] * 128)
    isolated = [name for name in replay.chunks if not replay.successor(name) and not replay.predecessor(name)]
    assert len(isolated) > 0.7 * replay.num_chunks
    steps = one_step_per_window(sample_many(replay, 64_000, length))
    by_position = np.bincount(steps % chunk, minlength=chunk)
    assert stats.chisquare(by_position).pvalue > 0.01, by_position
    edges, middle = by_position[[0, -1]].mean(), by_position[24:40].mean()
    assert 0.9 < edges / middle < 1.1
    stored = np.concatenate([value["step"] for value in replay.chunks.values()])
    by_step = np.array([np.count_nonzero(steps == step) for step in np.sort(stored)])
    assert stats.chisquare(by_step).pvalue > 0.01


def test_a_window_past_the_end_of_a_run_wraps_to_its_start_as_a_new_sequence():
    """Two consecutive stored chunks (a run) and one isolated chunk: a window starting near the
    run's end continues at the run's first step, and one near the isolated chunk's end at that
    chunk's first step, with is_first set there and nowhere else inside the window."""
    replay = tools.Replay(None, 10 ** 6, seed=9, chunk=16)
    add_stream(replay, [80])  # chunks 0..4 (steps 0..79)
    replay.remove(list(replay.chunks)[2])  # runs: chunks 0-1 (steps 0..31), chunks 3-4 (steps 48..79)
    replay.remove(list(replay.chunks)[2])  # chunk 3 too: chunk 4 (steps 64..79) stands alone
    windows = {(name, offset): replay.window(name, offset, 10, 0) for name in replay.chunks for offset in range(16)}
    runs = [(0, 32), (64, 80)]
    for window in windows.values():
        start = int(window["step"][0])
        first, end = next(run for run in runs if run[0] <= start < run[1])
        expected = first + (start - first + np.arange(10)) % (end - first)
        np.testing.assert_array_equal(window["step"], expected)
        resumed = np.flatnonzero(np.diff(expected) != 1) + 1
        np.testing.assert_array_equal(np.flatnonzero(window["is_first"][1:]) + 1, resumed)


def test_running_episode_is_sampled_before_it_ends():
    """200 steps into a 1000-step episode: the three closed 64-step chunks are sampled, the
    open fourth is not yet."""
    replay = tools.Replay(None, capacity=10 ** 6, seed=2, chunk=64)
    add_stream(replay, [200])  # no is_last yet: the episode is still running
    assert replay.can_sample(32)
    batch = replay.sample(3000, 32)
    seen = np.unique(batch["t"])
    assert seen.min() == 0 and seen.max() == 191
    assert len(seen) == 192


def test_sampling_before_a_chunk_is_complete_is_a_clear_error():
    replay = tools.Replay(None, capacity=1000, chunk=64)
    add_stream(replay, [63])
    assert not replay.can_sample(32)
    with pytest.raises(RuntimeError, match="prefill"):
        replay.sample(2, 32)
    add_stream(replay, [1])
    with pytest.raises(ValueError, match="replay_chunk"):
        replay.sample(2, 65)


# ----------------------------------------------------------------- LLCD context before a window


def test_prefix_holds_the_stored_steps_before_each_window():
    """prefix = 17: windows starting mid-stream carry the 17 steps before them; only the
    windows of the first chunk (no predecessor) are zero-padded, with prefix_stored False."""
    replay = tools.Replay(None, capacity=10 ** 6, seed=3, chunk=32)
    add_stream(replay, [100, 60])
    batch = replay.sample(4000, 16, prefix=17)
    steps, real = batch["step"], batch["prefix_stored"]
    assert steps.shape == (4000, 33) and real.shape == (4000, 17)
    start = steps[:, 17]
    expected_real = np.arange(17)[None] >= np.maximum(0, 17 - start)[:, None]
    expected_real[start >= 32] = True  # a predecessor chunk is stored for every later window
    np.testing.assert_array_equal(real, expected_real)
    prefix = np.where(real, steps[:, :17], -1)
    wanted = np.where(real, start[:, None] - 17 + np.arange(17)[None], -1)
    np.testing.assert_array_equal(prefix, wanted)
    assert np.all(steps[:, :17][~real] == 0)
    assert (start >= 32).mean() > 0.7 and (start < 17).any()


def test_prefix_is_padded_where_the_predecessor_was_evicted():
    replay = tools.Replay(None, capacity=64, seed=4, policy="fifo", chunk=32)  # holds 2 chunks
    add_stream(replay, [200])  # 6 chunks closed: chunks 4 and 5 (steps 128..191) remain
    batch = replay.sample(2000, 8, prefix=9)
    start = batch["step"][:, 9]
    assert start.min() >= 128
    first = start < 160  # windows in chunk 4, whose predecessor is gone
    assert np.all(~batch["prefix_stored"][first & (start - 128 < 9)].all(1))
    assert np.all(batch["prefix_stored"][~first])


# ----------------------------------------------------------------- reservoir and FIFO


class RandomEviction(tools.Replay):
    """The common mistake: always admit, evict a uniformly random stored chunk."""

    def admit(self):
        if len(self.chunks) >= self.slots:
            self.remove(list(self.chunks)[self.rng.integers(0, len(self.chunks))])
        return True


def retention_by_arrival_decile(make_replay, seeds=30):
    """Stored chunks per decile of arrival time, pooled over seeds, for streams of episodes of
    3-12 steps (8-step chunks, 50 slots, 4000 steps offered). Chunks, not steps, are counted:
    the 8 steps of a chunk are kept together, so step counts are not independent."""
    counts = np.zeros(10)
    for seed in range(seeds):
        replay = make_replay(seed)
        lengths = np.random.default_rng(100 + seed).integers(3, 13, size=1000)
        lengths = lengths[np.cumsum(lengths) <= 4000]
        total = add_stream(replay, lengths.tolist())
        offered = total // 8  # closed chunks
        kept = np.array([chunk["step"][0] // 8 for chunk in replay.chunks.values()])
        counts += np.bincount(kept * 10 // offered, minlength=10)
    return counts


def test_reservoir_keeps_every_step_alike_whatever_the_episode_lengths():
    counts = retention_by_arrival_decile(lambda seed: tools.Replay(None, 400, seed, "reservoir", chunk=8))
    assert counts.sum() == 30 * 50
    assert stats.chisquare(counts).pvalue > 0.01, counts


def test_random_eviction_fails_the_same_uniformity_test():
    """The test above has the power to see a recency bias."""
    counts = retention_by_arrival_decile(lambda seed: RandomEviction(None, 400, seed, "reservoir", chunk=8))
    assert stats.chisquare(counts).pvalue < 1e-6 and counts[-1] > 5 * counts[0], counts


def test_reservoir_each_chunk_kept_with_probability_k_over_n():
    kept_early = kept_late = 0
    for seed in range(200):
        replay = tools.Replay(None, 50, seed, "reservoir", chunk=5)  # k = 10 of n = 100 chunks
        add_stream(replay, [7] * 71 + [3])  # 500 steps in episodes that do not align with chunks
        firsts = {int(chunk["step"][0]) for chunk in replay.chunks.values()}
        kept_early += sum(5 * i in firsts for i in range(10))
        kept_late += sum(5 * i in firsts for i in range(90, 100))
    expected = 200 * 10 * 10 / 100  # seeds x chunks x k/n
    for kept in (kept_early, kept_late):
        assert abs(kept - expected) < 4 * np.sqrt(expected), (kept_early, kept_late, expected)


def test_fifo_keeps_the_newest_chunks():
    replay = tools.Replay(None, 40, 0, "fifo", chunk=10)
    add_stream(replay, [33] * 3 + [5])  # 104 steps: chunks 0..9 closed
    assert [int(chunk["step"][0]) for chunk in replay.chunks.values()] == [60, 70, 80, 90]
    assert replay.num_steps == 40 and replay.seen == 10


def test_task_fractions_count_steps():
    replay = tools.Replay(None, 10 ** 6, 0, "fifo", chunk=10)
    end = add_stream(replay, [30], task=0)
    add_stream(replay, [10], first_step=end, task=2)
    assert replay.task_fractions() == {0: 0.75, 2: 0.25}


# ----------------------------------------------------------------- disk mirror


def test_disk_mirrors_memory_and_a_restart_reloads_it(tmp_path):
    directory = tmp_path / "eps"
    first = tools.Replay(directory, 10 ** 6, 0, "reservoir", chunk=8)
    add_stream(first, [13, 21, 9])
    assert files_on_disk(directory) == sorted(first.chunks) and len(first.chunks) == 5
    second = tools.Replay(directory, 10 ** 6, 0, "reservoir", chunk=8).load()
    assert list(second.chunks) == list(first.chunks)
    for name, chunk in first.chunks.items():
        for key, value in chunk.items():
            np.testing.assert_array_equal(second.chunks[name][key], value)
    # the streams link up again: windows run on across chunk files
    batch = second.sample(500, 8)
    diffs = np.diff(batch["step"], axis=1)
    assert np.all((diffs == 1) | batch["is_first"][:, 1:]) and (batch["step"][:, 0] % 8 != 0).any()


def test_unreadable_or_foreign_chunk_files_are_skipped_with_a_warning(tmp_path):
    directory = tmp_path / "eps"
    first = tools.Replay(directory, 10 ** 6, chunk=8)
    add_stream(first, [24])
    names = list(first.chunks)
    (directory / f"{names[1]}.npz").write_bytes(b"this is not a zip file")
    other = tools.Replay(directory / "other", 10 ** 6, chunk=4)
    add_stream(other, [4])
    foreign = next(iter(other.chunks))
    os.replace(directory / "other" / f"{foreign}.npz", directory / f"{foreign}.npz")
    with pytest.warns(UserWarning) as caught:
        second = tools.Replay(directory, 10 ** 6, chunk=8).load()
    messages = " ".join(str(warning.message) for warning in caught)
    assert names[1] in messages and foreign in messages and "replay_chunk" in messages
    assert list(second.chunks) == [names[0], names[2]]
    assert (directory / f"{names[1]}.npz.corrupt").exists()
