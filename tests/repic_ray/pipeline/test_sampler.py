from repic_ray.pipeline.sampler import PromptSampler


def test_epochs_cover_every_item_once_and_reshuffle():
    s = PromptSampler(list("abcde"), seed=3)
    first = s.next(5)
    second = s.next(5)
    assert sorted(x for _, x in first) == list("abcde")
    assert sorted(x for _, x in second) == list("abcde")
    later = [[x for _, x in s.next(5)] for _ in range(3)]
    orders = {tuple(x for _, x in first), tuple(x for _, x in second), *map(tuple, later)}
    assert len(orders) > 1  # reshuffled per epoch (5 equal orders in a row: 1 in 120^4)
    uids = [u for u, _ in first + second]
    assert len(set(uids)) == 10


def test_resume_draws_the_same_sequence():
    a = PromptSampler(list(range(7)), seed=1)
    a.next(4)
    state = a.state_dict()
    expected = a.next(9)
    b = PromptSampler(list(range(7)), seed=1)
    b.load_state_dict(state)
    assert b.next(9) == expected


def test_seed_changes_order():
    assert PromptSampler(list(range(20)), seed=0).next(20) != PromptSampler(list(range(20)), seed=1).next(20)
