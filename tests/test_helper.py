"""helper.py and the demo's jobs: a job gives the same result in a spawned helper process as inline, so
the demo's numbers do not depend on how many cores the machine has."""

import pytest
import torch

from nitrofusion.distill_config import PairsConfig
from nitrofusion.studies.helper import Helper, Inline, start_helper
from nitrofusion.worlds.mini import demo_jobs


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher, tmp_path_factory):
    from nitrofusion.worlds.mini.teacher import TeacherTrainConfig, save_teacher

    out = tmp_path_factory.mktemp("teacher")
    save_teacher(tiny_teacher.unet, TeacherTrainConfig(model=tiny_teacher.model, sampler=tiny_teacher.sampler),
                 out, {"note": "random tiny teacher for tests"})
    return str(out)


def test_start_helper_uses_the_cores_left_and_runs_inline_without_one():
    assert isinstance(start_helper(1, cores=1), Inline)
    helper = start_helper(1, cores=4)
    assert isinstance(helper, Helper) and helper.num_threads == 3
    helper.close()


def test_inline_delivers_errors_through_the_future():
    job = Inline().submit(int, "not a number")
    with pytest.raises(ValueError):
        job.result()


def test_pair_shards_split_over_two_processes_equal_one_process(teacher_dir, tmp_path):
    from nitrofusion.data.pairs import load_pairs, pair_inputs, write_index_file
    from nitrofusion.worlds.mini.adapter import MiniAdapter
    from nitrofusion.worlds.mini.data import class_prompts
    from nitrofusion.worlds.mini.teacher import load_teacher

    adapter = MiniAdapter(load_teacher(teacher_dir))
    one, two = tmp_path / "one", tmp_path / "two"
    demo_jobs.share_of_pairs(adapter, 40, 3, str(one), 16, 8, [0, 1, 2])
    with Helper(1) as helper:
        job = helper.submit(demo_jobs.pair_shards, teacher_dir, 40, 3, str(two), 16, 8, [1])
        demo_jobs.share_of_pairs(adapter, 40, 3, str(two), 16, 8, [0, 2])
        job.result()
    shards = sorted(p.name for p in one.glob("shard-*"))
    assert shards == sorted(p.name for p in two.glob("shard-*")) and len(shards) == 3
    for name in shards:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    write_index_file(two, 40, 3, 16, adapter)
    pairs = load_pairs(two)
    inputs = pair_inputs(adapter, class_prompts(), 40, 3, 16)  # the inputs alone, without the teacher
    assert torch.equal(inputs.x_T, pairs.x_T) and inputs.prompts == pairs.prompts


def test_student_rows_in_a_helper_equal_inline(teacher_dir, tiny_teacher, tmp_path):
    student = tmp_path / "unet"
    tiny_teacher.unet.save_pretrained(student, safe_serialization=True)
    pairs = PairsConfig(seed=5, shard_size=16, batch_size=16)
    args = (teacher_dir, str(student), 24, pairs, 500, 0, [1, 2])
    inline = demo_jobs.student_rows(*args)
    with Helper(1) as helper:
        spawned = helper.submit(demo_jobs.student_rows, *args).result()
    assert set(inline) == set(spawned) == {1, 2}
    for k in inline:
        assert inline[k]["scores"] == spawned[k]["scores"]
        assert torch.equal(inline[k]["grid"], spawned[k]["grid"])


def test_demo_progress_scales_what_is_left_by_how_the_finished_phases_went():
    from nitrofusion.studies.demo import Progress

    lines = []
    progress = Progress({"teacher pairs": 10.0, "training": 20.0, "evaluation": 30.0}, lines.append)
    progress.done("teacher pairs", 20.0, "pairs")  # twice the forecast: the rest is expected twice as slow
    progress.done("training", 20.0, "training")  # 40 s for a forecast of 30 s so far
    progress.done("evaluation", 5.0, "evaluation")
    assert lines == ["pairs: 20 s; about 100 s left (training, evaluation)",
                     "training: 20 s; about 40 s left (evaluation)", "evaluation: 5 s"]


def test_demo_progress_ignores_a_phase_the_cache_skipped():
    from nitrofusion.studies.demo import Progress

    lines = []
    progress = Progress({"teacher pairs": 30.0, "training": 20.0, "evaluation": 10.0}, lines.append)
    progress.done("teacher pairs", 0.5, "pairs")  # found in the cache: no evidence about this machine's speed
    assert lines == ["pairs: 0 s; about 30 s left (training, evaluation)"]
