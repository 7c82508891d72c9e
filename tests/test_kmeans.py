"""Tests of lsgs.kmeans: the FAISS wrapper against brute force, torch Lloyd's and scikit-learn; errors."""

import faiss
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SkKMeans

import lsgs.kmeans as km
from lsgs.errors import ConfigError
from lsgs.kmeans import KMeansResult, faiss_gpu_available, kmeans, kmeans_plusplus, torch_kmeans

EXPECTED_BACKEND = "faiss-gpu" if faiss_gpu_available() else "faiss-cpu"
NO_GPU_REASON = "this FAISS has no GPU (faiss-cpu build, or faiss-gpu with no CUDA device visible)"


def blobs(n_per=100, k=6, d=5, spread=0.1, sep=20.0, seed=0):
    """Well-separated Gaussian blobs: ``[k * n_per, d]`` points, ``[k, d]`` means, ``[k * n_per]`` labels."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g) * sep
    labels = torch.arange(k).repeat_interleave(n_per)
    x = means[labels] + spread * torch.randn(k * n_per, d, generator=g)
    return x, means, labels


def brute_inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    return float((torch.cdist(x.double(), centroids.double()) ** 2).min(dim=1).values.mean())


def match_centres(found: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Distance from each true centre to the nearest found one."""
    return torch.cdist(true.double(), found.double()).min(dim=1).values


class TestFaissKMeans:
    def test_result_fields_and_inertia(self):
        x, _, _ = blobs(seed=1)
        r = kmeans(x, 6, niter=10, seed=0)
        assert isinstance(r, KMeansResult)
        assert r.centroids.shape == (6, 5) and r.centroids.dtype == torch.float32
        assert r.centroids.device.type == "cpu"
        # Any FAISS build: the automatic choice is the GPU exactly when this FAISS has one.
        assert r.backend == EXPECTED_BACKEND
        assert 1 <= r.iterations <= 10 and r.seconds > 0
        assert r.inertia == pytest.approx(brute_inertia(x, r.centroids), rel=1e-4)

    @pytest.mark.parametrize("init", ["random", "kmeans++"])
    def test_seeded_repeatability(self, init):
        x, _, _ = blobs(n_per=50, k=20, d=8, spread=3.0, seed=2)  # overlapping: many local optima
        a = kmeans(x, 16, seed=7, init=init)
        b = kmeans(x, 16, seed=7, init=init)
        assert torch.equal(a.centroids, b.centroids)
        assert a.inertia == b.inertia
        c = kmeans(x, 16, seed=8, init=init)
        assert not torch.equal(a.centroids, c.centroids)

    def test_numpy_input_matches_tensor(self):
        x, _, _ = blobs(seed=3)
        assert torch.equal(kmeans(x.numpy(), 6).centroids, kmeans(x, 6).centroids)
        assert torch.equal(kmeans(x.double(), 6).centroids, kmeans(x, 6).centroids)

    def test_recovers_separated_clusters_kmeanspp(self):
        x, means, _ = blobs(n_per=80, k=10, d=6, seed=4)
        r = kmeans(x, 10, init="kmeans++", seed=0)
        assert match_centres(r.centroids, means).max() < 0.1
        assert r.inertia == pytest.approx(0.1**2 * 6, rel=0.2)  # only the within-blob noise remains

    def test_tensor_init(self):
        x, means, _ = blobs(n_per=80, k=10, d=6, seed=5)
        init = means + 1.0  # off-centre start inside each blob's basin
        r = kmeans(x, 10, init=init, seed=0)
        # Started from per-blob seeds, Lloyd's ends at the blob means in the same order.
        assert (r.centroids - means).norm(dim=1).max() < 0.1

    def test_same_fixed_point_as_torch_reference(self):
        x, _, _ = blobs(n_per=60, k=8, d=4, spread=2.0, sep=4.0, seed=6)  # overlapping blobs
        init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:8]]
        f = kmeans(x, 8, init=init, niter=50)
        t = torch_kmeans(x, 8, init=init, niter=50)
        torch.testing.assert_close(f.centroids, t.centroids, rtol=1e-4, atol=1e-4)
        assert f.inertia == pytest.approx(t.inertia, rel=1e-5)

    def test_subsampling_follows_max_points_per_centroid(self):
        x, _, _ = blobs(n_per=200, k=4, d=3, spread=1.0, sep=5.0, seed=7)  # 800 points
        r = kmeans(x, 4, max_points_per_centroid=50, seed=3)  # -> 200 training points
        sub = km._subsample(x, 200, 3)
        assert sub.shape == (200, 3)
        assert r.inertia == pytest.approx(brute_inertia(sub, r.centroids), rel=1e-4)
        assert km._subsample(x, 800, 3) is x  # no sub-sampling when within the cap

    def test_verbose_and_few_points_warning(self, capfd):
        x, _, _ = blobs(n_per=30, k=4, d=3, seed=8)
        with pytest.warns(UserWarning, match="fewer than 39 per cluster"):
            kmeans(x, 4, max_points_per_centroid=10, verbose=True, niter=2)
        assert "sub-sampled 40 of 120 vectors" in capfd.readouterr().out


class TestGpuSelection:
    def test_availability_matches_faiss(self):
        expected = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        assert faiss_gpu_available() == expected

    def test_cpu_is_available_in_every_build(self):
        x, _, _ = blobs(seed=9)
        assert kmeans(x, 6, use_gpu=False).backend == "faiss-cpu"
        assert kmeans(x, 6, use_gpu=None).backend == EXPECTED_BACKEND

    def test_asking_for_a_missing_gpu_is_a_config_error(self):
        if faiss_gpu_available():
            pytest.skip("this FAISS has a GPU: use_gpu=True is valid here")
        x, _, _ = blobs(seed=9)
        with pytest.raises(ConfigError, match="use_gpu=True but FAISS has no GPU"):
            kmeans(x, 6, use_gpu=True)

    def test_gpu_matches_cpu(self):
        if not faiss_gpu_available():
            pytest.skip(NO_GPU_REASON)
        x, means, _ = blobs(n_per=80, k=10, d=6, seed=4)
        init = means + 1.0  # same start on both devices: Lloyd's must end at the same (blob-mean) fixed point
        gpu, cpu = kmeans(x, 10, init=init, use_gpu=True), kmeans(x, 10, init=init, use_gpu=False)
        assert gpu.backend == "faiss-gpu" and gpu.centroids.device.type == "cpu"
        torch.testing.assert_close(gpu.centroids, cpu.centroids, rtol=1e-4, atol=1e-4)
        assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-4)

    def test_resolution(self, monkeypatch):
        monkeypatch.setattr(km, "faiss_gpu_available", lambda: True)
        assert km._resolve_use_gpu(None) is True
        assert km._resolve_use_gpu(True) is True
        assert km._resolve_use_gpu(False) is False
        monkeypatch.setattr(km, "faiss_gpu_available", lambda: False)
        assert km._resolve_use_gpu(None) is False
        with pytest.raises(ConfigError):
            km._resolve_use_gpu(True)


class TestErrors:
    def test_too_few_vectors(self):
        with pytest.raises(ConfigError, match=r"got 5 vectors for 8 clusters.*smaller codebook_size"):
            kmeans(torch.randn(5, 3), 8)
        with pytest.raises(ConfigError, match="got 5 vectors for 8 clusters"):
            torch_kmeans(torch.randn(5, 3), 8)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite(self, bad):
        x = torch.randn(50, 3)
        x[7, 1] = bad
        with pytest.raises(ValueError, match="1 of 50 vectors contain NaN or infinite"):
            kmeans(x, 4)
        with pytest.raises(ValueError, match="NaN or infinite"):
            torch_kmeans(x, 4)

    @pytest.mark.parametrize(
        ("kwargs", "exc", "match"),
        [
            ({"num_clusters": 0}, ConfigError, "num_clusters"),
            ({"niter": 0}, ConfigError, "niter"),
            ({"max_points_per_centroid": 0}, ConfigError, "max_points_per_centroid"),
            ({"init": "greedy"}, ConfigError, "'greedy'"),
            ({"init": torch.zeros(3, 3)}, ValueError, r"shape \(3, 3\), expected .* \(4, 3\)"),
            ({"init": torch.full((4, 3), float("nan"))}, ValueError, "init tensor contains NaN"),
        ],
    )
    def test_bad_arguments(self, kwargs, exc, match):
        args = {"num_clusters": 4, **kwargs}
        with pytest.raises(exc, match=match):
            kmeans(torch.randn(200, 3), **args)

    def test_bad_vectors(self):
        with pytest.raises(ValueError, match=r"2-D \[N, D\], got shape \(50,\)"):
            kmeans(torch.randn(50), 4)
        with pytest.raises(ConfigError, match="list"):
            kmeans([[0.0, 1.0]] * 10, 2)
        with pytest.raises(ValueError, match="dimension 0"):
            kmeans(torch.randn(50, 0), 4)
        with pytest.raises(ValueError, match="2-D"):
            torch_kmeans(torch.randn(50), 4)
        with pytest.raises(ConfigError, match="list"):
            torch_kmeans([[0.0, 1.0]] * 10, 2)


class TestKMeansPlusPlus:
    def test_one_seed_per_separated_cluster(self):
        x, _, labels = blobs(n_per=50, k=12, d=4, seed=10)
        centres = kmeans_plusplus(x, 12, seed=0, chunk_size=64)  # several chunks
        rows = [int(torch.nonzero((x == c).all(dim=1))[0]) for c in centres]  # every centre is a data point
        assert sorted(labels[rows].tolist()) == list(range(12))

    def test_seeded_and_chunk_independent(self):
        x, _, _ = blobs(n_per=40, k=5, d=3, spread=2.0, sep=3.0, seed=11)
        a = kmeans_plusplus(x, 7, seed=1)
        assert torch.equal(a, kmeans_plusplus(x, 7, seed=1, chunk_size=17))
        assert not torch.equal(a, kmeans_plusplus(x, 7, seed=2))

    def test_duplicate_points(self):
        x = torch.ones(10, 3)  # all distances 0: falls back to uniform picks
        assert torch.equal(kmeans_plusplus(x, 4, seed=0), torch.ones(4, 3))


class TestTorchKMeans:
    def test_matches_sklearn_lloyd(self):
        x, _, _ = blobs(n_per=60, k=8, d=4, spread=2.0, sep=4.0, seed=12)
        init = x[:8].clone()
        t = torch_kmeans(x, 8, init=init, niter=30)
        sk = SkKMeans(8, init=init.double().numpy(), n_init=1, max_iter=30, tol=0.0, algorithm="lloyd")
        sk.fit(x.double().numpy())
        torch.testing.assert_close(t.centroids.double(), torch.from_numpy(sk.cluster_centers_), rtol=1e-4,
                                   atol=1e-4)
        assert t.inertia == pytest.approx(sk.inertia_ / len(x), rel=1e-4)
        assert t.backend == "torch"

    @pytest.mark.parametrize("init", ["random", "kmeans++"])
    def test_seeded(self, init):
        x, _, _ = blobs(n_per=30, k=6, d=3, spread=2.0, sep=3.0, seed=13)
        a, b = torch_kmeans(x, 5, init=init, seed=4), torch_kmeans(x, 5, init=init, seed=4)
        assert torch.equal(a.centroids, b.centroids)
        assert a.inertia == pytest.approx(brute_inertia(x, a.centroids), rel=1e-5)

    def test_stops_when_converged(self):
        x, means, _ = blobs(n_per=20, k=3, d=2, seed=14)
        r = torch_kmeans(x, 3, init=means, niter=50)
        assert r.iterations < 5

    def test_empty_cluster_is_split(self):
        x, means, _ = blobs(n_per=50, k=2, d=2, seed=15)
        init = torch.cat([means, torch.full((1, 2), 1e4)])  # third centre attracts no point
        r = torch_kmeans(x, 3, init=init, niter=10)
        assert r.centroids.abs().max() < 1e3  # moved next to the data
        counts = torch.bincount(torch.cdist(x, r.centroids).argmin(dim=1), minlength=3)
        assert (counts > 0).all()
        two = torch_kmeans(x, 2, init=means, niter=10)
        assert r.inertia < two.inertia

    def test_split_helper_matches_faiss_rule(self):
        centroids = torch.tensor([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]])
        counts = torch.tensor([1, 10, 0])
        n = km._split_empty_clusters(centroids, counts, torch.Generator().manual_seed(0))
        assert n == 1
        eps = 1 / 1024
        # Only cluster 1 can be split (probability ~ size - 1); its centre is perturbed in both directions.
        torch.testing.assert_close(centroids[2], torch.tensor([3 * (1 + eps), 4 * (1 - eps)]))
        torch.testing.assert_close(centroids[1], torch.tensor([3 * (1 - eps), 4 * (1 + eps)]))
        np.testing.assert_array_equal(centroids[0].numpy(), [1.0, 2.0])

    def test_split_helper_nothing_to_split(self):
        centroids = torch.zeros(3, 2)
        assert km._split_empty_clusters(centroids, torch.tensor([1, 1, 0]), torch.Generator()) == 0
        assert torch.equal(centroids, torch.zeros(3, 2))


def test_float64_and_numpy_inputs_are_subsampled_before_conversion():
    x = torch.randn(400, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    r64 = kmeans(x, 4, max_points_per_centroid=40, seed=1)
    r32 = kmeans(km._subsample(x, 160, 1).float(), 4, max_points_per_centroid=40, seed=1)
    assert torch.equal(r64.centroids, r32.centroids)
