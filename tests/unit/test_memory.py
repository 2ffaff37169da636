"""ZeRO memory arithmetic against the figures of the ZeRO paper (Rajbhandari et al. 2020, Figure 1)."""

import pytest

from dist_train.config.memory import model_state_bytes

GB = 1e9


@pytest.mark.parametrize("stage, expected_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure_1(stage, expected_gb):
    # 7.5B parameters, 64 data-parallel GPUs, mixed-precision Adam (K = 12)
    assert model_state_bytes(7.5e9, stage, 64).total / GB == pytest.approx(expected_gb, abs=0.06)


def test_offload_and_fp32():
    s = model_state_bytes(1e9, 3, 8, offload_optimizer=True, offload_params=True)
    assert s.on_cpu == pytest.approx(12e9 / 8 + 2e9 / 8) and s.on_device == pytest.approx(2e9 / 8)
    assert model_state_bytes(1e9, 0, 1, precision="fp32").total == 16e9  # 4 + 4 + 8
    assert model_state_bytes(1e9, 2, 4, offload_optimizer=True).on_device == pytest.approx(2e9 + 2e9 / 4)
