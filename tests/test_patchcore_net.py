"""Tests of lsgs.nn.patchcore against direct computations on tiny inputs: pooling and resizing, greedy k-center
picks, nearest neighbours (torch and FAISS vs torch.cdist), the blur vs scipy, Eq. 7 vs a loop, PatchCoreNet."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from lsgs.nn.patchcore import (
    PatchCoreNet,
    anomaly_map,
    build_faiss_index,
    coreset_start,
    gaussian_blur,
    gaussian_kernel_size,
    gaussian_projection,
    greedy_coreset,
    locally_aware_features,
    max_image_score,
    nearest_neighbours_faiss,
    nearest_neighbours_torch,
    patch_rows,
    reweighted_image_score,
)


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bilinear_reference(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``align_corners=False`` bilinear resize of ``[h, w]`` by loops: source coordinate
    ``(i + 0.5) * in / out - 0.5`` clamped at 0, linear weights to the two neighbours (edge clamped)."""
    h, w = x.shape
    out = np.zeros(size)

    def taps(i, n_in, n_out):
        c = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(math.floor(c), n_in - 1)
        return lo, min(lo + 1, n_in - 1), c - lo

    for i in range(size[0]):
        y0, y1, fy = taps(i, h, size[0])
        for j in range(size[1]):
            x0, x1, fx = taps(j, w, size[1])
            top = (1 - fx) * x[y0, x0] + fx * x[y0, x1]
            bottom = (1 - fx) * x[y1, x0] + fx * x[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


# ------------------------------------------------------------------------------------------------ features


class TestLocallyAwareFeatures:
    def test_against_loops(self):
        fine, coarse = randn(2, 3, 6, 5, seed=1), randn(2, 4, 3, 3, seed=2)
        out = locally_aware_features([fine, coarse])
        assert out.shape == (2, 7, 6, 5)

        def pooled(x):  # 3x3 mean, zero padding counted (divisor always 9)
            padded = np.pad(x, 1)
            return np.array(
                [
                    [padded[i : i + 3, j : j + 3].sum() / 9 for j in range(x.shape[1])]
                    for i in range(x.shape[0])
                ]
            )

        for b in range(2):
            for c in range(3):
                np.testing.assert_allclose(out[b, c].numpy(), pooled(fine[b, c].numpy()), atol=1e-6)
            for c in range(4):
                expected = bilinear_reference(pooled(coarse[b, c].numpy()), (6, 5))
                np.testing.assert_allclose(out[b, 3 + c].numpy(), expected, atol=1e-6)

    def test_patch_rows_order(self):
        embedding = randn(2, 3, 4, 5)
        rows = patch_rows(embedding)
        assert rows.shape == (40, 3)
        torch.testing.assert_close(rows[1 * 20 + 2 * 5 + 3], embedding[1, :, 2, 3])  # row (b, y, x)

    @pytest.mark.parametrize("patch_size", [0, 2, True])
    def test_bad_patch_size(self, patch_size):
        with pytest.raises(ValueError, match="patch_size"):
            locally_aware_features([randn(1, 2, 4, 4)], patch_size=patch_size)

    def test_bad_maps(self):
        with pytest.raises(ValueError, match="one B"):
            locally_aware_features([randn(1, 2, 4, 4), randn(2, 2, 2, 2)])


# ------------------------------------------------------------------------------------------------- coreset


def brute_force_k_center(points: torch.Tensor, size: int, start: int) -> list[int]:
    """Greedy k-center by the definition: a full float64 distance matrix, min over the chosen columns."""
    distances = torch.cdist(points.double(), points.double())  # [N, N]
    chosen = [start]
    while len(chosen) < size:
        to_chosen = distances[:, chosen].min(dim=1).values
        chosen.append(int(to_chosen.argmax()))
    return chosen


class TestGreedyCoreset:
    def test_same_picks_as_brute_force_without_projection(self):
        features = randn(80, 6, seed=3)
        picks = greedy_coreset(features, 0.25, projection_dim=None, seed=5)
        assert picks.tolist() == brute_force_k_center(features, 20, coreset_start(80, 5))

    def test_same_picks_as_brute_force_with_projection(self):
        features = randn(90, 40, seed=4)
        picks = greedy_coreset(features, 0.1, projection_dim=8, seed=2, chunk_size=7)
        projected = features @ gaussian_projection(40, 8, seed=2)
        assert picks.tolist() == brute_force_k_center(projected, 9, coreset_start(90, 2))
        # The projection matters: on the raw features the picks differ.
        assert picks.tolist() != brute_force_k_center(features, 9, coreset_start(90, 2))

    def test_same_picks_as_brute_force_on_clusters(self):
        # Clustered points, as real patch features are: here most steps skip most points (the triangle-inequality
        # pruning), and the picks must still be those of the definition.
        generator = torch.Generator().manual_seed(6)
        centres = torch.randn(30, 8, generator=generator) * 4
        features = centres[torch.randint(30, (600,), generator=generator)] + torch.randn(
            600, 8, generator=generator
        )
        picks = greedy_coreset(features, 0.2, projection_dim=None, seed=1)
        assert picks.tolist() == brute_force_k_center(features, 120, coreset_start(600, 1))

    def test_projection_is_seeded_gaussian(self):
        projection = gaussian_projection(200, 50, seed=1)
        assert torch.equal(projection, gaussian_projection(200, 50, seed=1))
        assert not torch.equal(projection, gaussian_projection(200, 50, seed=2))
        assert projection.std().item() == pytest.approx(1 / math.sqrt(50), rel=0.05)

    @pytest.mark.parametrize(
        ("n", "fraction", "size"), [(10, 0.01, 1), (50, 0.1, 5), (7, 1.0, 7), (30, 0.5, 15)]
    )
    def test_size(self, n, fraction, size):
        picks = greedy_coreset(randn(n, 4), fraction)
        assert picks.shape == (size,) and picks.dtype == torch.int64 and picks.unique().numel() == size

    def test_seeded(self):
        features = randn(200, 16)
        assert torch.equal(greedy_coreset(features, 0.1, seed=0), greedy_coreset(features, 0.1, seed=0))
        assert not torch.equal(greedy_coreset(features, 0.1, seed=0), greedy_coreset(features, 0.1, seed=1))

    def test_duplicates_stop_early(self):
        features = randn(3, 5).repeat(4, 1)  # 12 points, 3 distinct
        picks = greedy_coreset(features, 1.0, projection_dim=None)
        assert picks.numel() == 3 and sorted(p % 3 for p in picks.tolist()) == [0, 1, 2]

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [({"fraction": 0.0}, "fraction"), ({"fraction": 1.5}, "fraction"), ({"projection_dim": 0}, "projection_dim"),
         ({"chunk_size": 0}, "chunk_size")],
    )  # fmt: skip
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            greedy_coreset(randn(10, 4), **{"fraction": 0.5, **kwargs})


# ---------------------------------------------------------------------------------------- nearest neighbour


class TestNearestNeighbours:
    @pytest.fixture
    def data(self):
        return randn(57, 6, seed=1), randn(23, 6, seed=2)

    def test_torch_against_cdist(self, data):
        queries, bank = data
        distances = torch.cdist(queries.double(), bank.double())
        for chunk_size in (None, 10, 4096):
            found = nearest_neighbours_torch(queries, bank, chunk_size=chunk_size)
            assert found.distances.shape == (57,) and found.indices.dtype == torch.int64
            torch.testing.assert_close(
                found.distances.double(), distances.min(dim=1).values, atol=1e-5, rtol=0
            )
            assert torch.equal(found.indices, distances.argmin(dim=1))

    def test_faiss_against_cdist(self, data):
        queries, bank = data
        distances = torch.cdist(queries.double(), bank.double())
        found = nearest_neighbours_faiss(queries, bank)
        torch.testing.assert_close(found.distances.double(), distances.min(dim=1).values, atol=1e-5, rtol=0)
        assert torch.equal(found.indices, distances.argmin(dim=1))
        three = nearest_neighbours_faiss(queries, build_faiss_index(bank), k=3)  # a reusable index
        expected = distances.topk(3, dim=1, largest=False)
        assert three.distances.shape == (57, 3)
        torch.testing.assert_close(three.distances.double(), expected.values, atol=1e-5, rtol=0)
        assert torch.equal(three.indices, expected.indices)

    def test_exact_match_is_zero(self, data):
        _, bank = data
        found = nearest_neighbours_torch(bank, bank)
        assert torch.equal(found.indices, torch.arange(23))
        # The expansion's float32 rounding in d^2 is ~1e-7 * ||q||^2, so d itself is ~3e-4 * ||q|| near zero
        # (here ||q|| ~ 2.5); the clamp keeps it from being NaN.
        assert found.distances.max() < 5e-3

    def test_errors(self, data):
        queries, bank = data
        with pytest.raises(ValueError, match="memory bank"):
            nearest_neighbours_torch(queries, bank[:, :5])
        with pytest.raises(ValueError, match="chunk_size"):
            nearest_neighbours_torch(queries, bank, chunk_size=0)
        with pytest.raises(ValueError, match=r"k must be in \[1, 23\]"):
            nearest_neighbours_faiss(queries, bank, k=24)


# ---------------------------------------------------------------------------------------------- maps, scores


class TestBlurAndMap:
    def test_kernel_size_as_anomalib(self):
        assert gaussian_kernel_size(4.0) == 33 and gaussian_kernel_size(1.0) == 9

    def test_against_scipy(self):
        # torch "reflect" padding is scipy's mode="mirror": equal everywhere up to float32 rounding (1e-5).
        # scipy's default mode="reflect" repeats the edge pixel, so it agrees only away from the border.
        image = randn(40, 37, seed=3)
        blurred = gaussian_blur(image.view(1, 1, 40, 37), sigma=4.0)[0, 0].double().numpy()
        mirror = gaussian_filter(image.double().numpy(), sigma=4.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(blurred, mirror, atol=1e-5)
        scipy_default = gaussian_filter(image.double().numpy(), sigma=4.0, truncate=4.0)
        r = 16  # the radius
        np.testing.assert_allclose(blurred[r:-r, r:-r], scipy_default[r:-r, r:-r], atol=1e-5)
        assert np.abs(blurred - scipy_default).max() > 1e-3

    def test_channels_blurred_alone(self):
        maps = randn(2, 3, 20, 20)
        blurred = gaussian_blur(maps, sigma=1.5)
        torch.testing.assert_close(blurred[1, 2:3], gaussian_blur(maps[1:2, 2:3], sigma=1.5)[0])

    def test_too_small_or_bad_sigma(self):
        with pytest.raises(ValueError, match=r"H, W > 16"):
            gaussian_blur(randn(1, 1, 16, 40))
        with pytest.raises(ValueError, match="sigma"):
            gaussian_blur(randn(1, 1, 40, 40), sigma=0.0)

    def test_anomaly_map(self):
        patches = randn(2, 4, 5).abs()
        unblurred = anomaly_map(patches, (24, 30), sigma=None)
        assert unblurred.shape == (2, 1, 24, 30)
        np.testing.assert_allclose(
            unblurred[1, 0].numpy(), bilinear_reference(patches[1].numpy(), (24, 30)), atol=1e-6
        )
        torch.testing.assert_close(anomaly_map(patches, (24, 30)), gaussian_blur(unblurred, 4.0))
        flat = anomaly_map(torch.full((1, 4, 4), 2.5), (32, 32))  # a normalised kernel keeps a constant
        torch.testing.assert_close(flat, torch.full((1, 1, 32, 32), 2.5))


def eq7_reference(features, distances, indices, bank, b) -> list[float]:
    """Paper Eq. 7 per image by loops in float64: s* times 1 - exp||m_test - m*|| / sum over N_b(m*)."""
    bank = bank.double()
    scores = []
    for i in range(features.shape[0]):
        star = int(distances[i].argmax())
        s_star = float(distances[i, star])
        m_test, m_star_index = features[i, star].double(), int(indices[i, star])
        to_bank = [float((bank[m_star_index] - bank[j]).norm()) for j in range(bank.shape[0])]
        neighbourhood = sorted(range(bank.shape[0]), key=lambda j: to_bank[j])[: min(b, bank.shape[0])]
        assert neighbourhood[0] == m_star_index
        denominator = sum(math.exp(float((m_test - bank[j]).norm())) for j in neighbourhood)
        scores.append((1 - math.exp(float((m_test - bank[m_star_index]).norm())) / denominator) * s_star)
    return scores


class TestImageScore:
    @pytest.mark.parametrize("num_neighbors", [9, 3, 50])
    def test_against_eq7_loop(self, num_neighbors):
        bank = randn(30, 4, seed=1)
        features = randn(3, 12, 4, seed=2) * 1.5  # [B, P, D]
        found = nearest_neighbours_torch(features.reshape(-1, 4), bank)
        distances, indices = found.distances.reshape(3, 12), found.indices.reshape(3, 12)
        scores = reweighted_image_score(features, distances, indices, bank, num_neighbors)
        expected = eq7_reference(features, distances, indices, bank, num_neighbors)
        np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)
        assert (scores < max_image_score(distances)).all()  # the weight is below 1

    def test_one_neighbour_is_the_maximum(self):
        distances = randn(2, 5).abs()
        features, bank = randn(2, 5, 3), randn(4, 3)
        indices = torch.zeros(2, 5, dtype=torch.int64)
        torch.testing.assert_close(
            reweighted_image_score(features, distances, indices, bank, 1), distances.amax(1)
        )
        torch.testing.assert_close(
            reweighted_image_score(features, distances, indices, bank[:1], 9), distances.amax(1)
        )
        assert torch.equal(max_image_score(distances.view(2, 1, 5)), distances.amax(1))


# ------------------------------------------------------------------------------------------------- the net


class TestPatchCoreNet:
    @staticmethod
    def features(seed: int, batch: int = 2) -> list[torch.Tensor]:
        return [randn(batch, 5, 8, 8, seed=seed), randn(batch, 7, 4, 4, seed=seed + 100)]

    @pytest.fixture
    def net(self) -> PatchCoreNet:
        net = PatchCoreNet()
        train = net.embed(self.features(1, batch=4))  # [4*8*8, 12]
        net.set_memory_bank(train[greedy_coreset(train, 0.25)])
        return net

    def test_composition_and_shapes(self, net):
        features = self.features(7)
        out = net(features, (40, 40))
        assert out.anomaly_map.shape == (2, 1, 40, 40) and out.image_score.shape == (2,)
        assert out.patch_distances.shape == (2, 8, 8) and net.memory_bank.shape == (64, 12)
        queries = patch_rows(locally_aware_features(features))
        distances = torch.cdist(queries, net.memory_bank).min(dim=1)
        torch.testing.assert_close(out.patch_distances, distances.values.view(2, 8, 8), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.anomaly_map, anomaly_map(out.patch_distances, (40, 40)))
        expected = reweighted_image_score(
            queries.view(2, 64, 12),
            distances.values.view(2, 64),
            distances.indices.view(2, 64),
            net.memory_bank,
        )
        torch.testing.assert_close(out.image_score, expected, atol=1e-5, rtol=0)

    def test_faiss_search_gives_the_same(self, net):
        features = self.features(7)
        out = net(features, (40, 40))
        net.search = "faiss"
        torch.testing.assert_close(net(features, (40, 40)).anomaly_map, out.anomaly_map, atol=1e-5, rtol=0)

    def test_training_patches_score_zero(self, net):
        net.set_memory_bank(net.embed(self.features(1, batch=1)))  # the whole bank of one image
        out = net(self.features(1, batch=1), (32, 32))
        assert out.patch_distances.max() < 5e-3 and out.image_score.abs().max() < 5e-3  # rounding level

    def test_state_dict_round_trip_resizes_the_bank(self, net):
        fresh = PatchCoreNet()
        assert fresh.memory_bank.shape == (0, 0)
        fresh.load_state_dict(net.state_dict())
        assert torch.equal(fresh.memory_bank, net.memory_bank)
        features = self.features(9)
        torch.testing.assert_close(fresh(features, (32, 32)).anomaly_map, net(features, (32, 32)).anomaly_map)

    def test_errors(self):
        with pytest.raises(RuntimeError, match="no memory bank"):
            PatchCoreNet()(self.features(1), (32, 32))
        with pytest.raises(ValueError, match="search"):
            PatchCoreNet(search="annoy")
