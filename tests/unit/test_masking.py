import numpy as np

from dist_train.train.masking import IGNORE, mask_batch

SPECIAL = np.array([0, 1, 2])  # pad, cls, sep


def batch(rows=64, length=128, seed=0):
    ids = np.random.default_rng(seed).integers(10, 1000, (rows, length))
    ids[:, 0], ids[:, -1] = 1, 2
    return ids


def test_bert_recipe_proportions_and_specials():
    rows = batch()
    ids, labels = mask_batch(rows, [(0, 5, i) for i in range(len(rows))], mask_id=3, vocab_size=1000,
                             special_ids=SPECIAL, probability=0.15)
    chosen = labels != IGNORE
    assert abs(chosen.mean() - 0.15 * 126 / 128) < 0.01
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert (labels[chosen] == rows[chosen]).all() and (ids[~chosen] == rows[~chosen]).all()
    masked = (ids[chosen] == 3).mean()
    unchanged = (ids[chosen] == rows[chosen]).mean()
    assert abs(masked - 0.8) < 0.03 and abs(unchanged - 0.1) < 0.03


def test_masks_depend_on_the_seed_only():
    rows = batch(rows=4)
    a = mask_batch(rows, [(0, 7, i) for i in range(4)], mask_id=3, vocab_size=1000, special_ids=SPECIAL,
                   probability=0.15)
    b = mask_batch(rows[2:], [(0, 7, i) for i in range(2, 4)], mask_id=3, vocab_size=1000, special_ids=SPECIAL,
                   probability=0.15)  # the same samples seen by another rank after a resize
    np.testing.assert_array_equal(a[0][2:], b[0])
    np.testing.assert_array_equal(a[1][2:], b[1])


def test_whole_word_masking_takes_every_sub_token():
    starts = np.ones(1000, dtype=bool)
    starts[500:] = False  # ids >= 500 continue the previous word
    rows = np.array([[1, 10, 600, 601, 20, 700, 30, 2] * 16])
    _, labels = mask_batch(rows, [(3,)], mask_id=3, vocab_size=1000, special_ids=SPECIAL, probability=0.5,
                           word_starts=starts)
    chosen = labels[0] != IGNORE
    for k in range(0, rows.shape[1], 8):  # the word 10 600 601 is masked whole or not at all
        assert chosen[k + 1] == chosen[k + 2] == chosen[k + 3]
        assert chosen[k + 4] == chosen[k + 5]
    assert 0 < chosen.mean() < 1
