"""Private compute kernels, one module per backend, all with the same functions and signatures.

Backends
--------
``cpp``    the compiled pybind11 extension ``stemfast._core`` (C++17, threads, GIL released)
``numba``  ``stemfast._kernels.numba_impl`` (``@njit(parallel=True, cache=True)``)
``numpy``  ``stemfast._kernels.numpy_ref`` -- the readable reference; the others must agree with it

Kernel contract (inputs are already validated by the public wrappers: C-contiguous, right dtype,
finite). Coordinates are ``(x, y)`` = (column, row) in pixels with pixel centres at integers.

``bandpass_apply(spec, height, width, noise_sigma, background_sigma) -> None``
    ``spec``: complex64[height, width // 2 + 1], the ``rfft2`` of a float32 image; multiplied in
    place by ``exp(-2 pi^2 ns^2 f^2) * (1 - exp(-2 pi^2 bs^2 f^2))`` with ``f^2 = fy^2 + fx^2`` in
    cycles/pixel (``fy = k / height`` for ``k <= height // 2`` else ``(k - height) / height``,
    ``fx = j / width``). ``ns <= 0`` drops the low-pass factor, ``bs <= 0`` the high-pass factor.
    The mask is the transfer function of a Gaussian blur of sigma ``ns`` minus that of ``bs``.

``local_maxima(image, radius, threshold, border) -> int64[N, 2]``
    ``image`` float32[H, W]. Pixel ``p = (x, y)`` with ``border <= x < W - border``,
    ``border <= y < H - border`` is a maximum when ``image[p] > threshold`` and for every other
    pixel ``q`` inside the image with ``|q - p|^2 <= radius^2``: ``image[q] < image[p]`` when ``q``
    comes later in raster order (row-major) and ``image[q] <= image[p]`` when earlier (so on a
    plateau the last pixel in raster order wins). Returns ``(x, y)`` rows in raster order.

``refine_com(image, xy, radius) -> float64[N, 2]``
    Centre of mass of ``image - min`` over the disc of pixels ``|q - c|^2 <= radius^2`` around
    ``c = round(xy)`` (``floor(v + 0.5)``), pixels inside the image only; ``min`` is the minimum
    over that disc. Zero total weight returns ``c``.

``refine_gauss(image, xy, radius, sigma0, n_iter) -> float64[N, 6]``
    Least-squares fit of ``B + A exp(-((u - x0)^2 + (v - y0)^2) / (2 s^2))`` to the disc pixels
    around ``c = round(xy)`` (inside the image only) by Levenberg-Marquardt (lambda 1e-3, x10 on a
    rejected step, /10 on an accepted one, at most ``n_iter`` iterations, stop when the steps of
    ``x0, y0, s`` are below 1e-6 px and those of ``A, B`` below 1e-6 times the disc's value range
    (max - min), or when the step's predicted cost reduction is below 1e-10 times the cost: criteria
    met above the rounding noise of the cost, so every backend stops alike; values enter the fit
    relative to the disc minimum). Start: ``x0, y0 = xy``, ``B`` = min over the disc,
    ``A`` = value at ``c`` minus ``B``, ``s = sigma0``. Columns: ``x0, y0, A, s, B, ok`` where ``ok``
    is 1.0 when the fit converged with ``A > 0``, ``0 < s < 2 radius`` and ``|(x0,y0) - xy| <= radius``,
    else 0.0 and the columns hold the start values (``x, y, A0, sigma0, B0``).

``fit_local_lattices(xy, neighbors, basis0, n_iter, outlier_tol) -> (origin, basis, rms, n_used)``
    ``xy`` float64[N, 2]; ``neighbors`` int64[N, K], indices into ``xy`` padded with -1 (the site
    itself may or may not appear; it is always used once); ``basis0`` float64[N, 2, 2] whose rows
    are the start lattice vectors ``a1, a2``. For site ``i`` with points ``d = xy[j] - xy[i]``:
    repeat ``n_iter`` times: ``[m, n] = floor((d - o) @ inv(B) + 0.5)``, residual
    ``r = d - o - [m, n] @ B``, use points with ``|r| <= outlier_tol * (|a1| + |a2|) / 2`` (``o`` = 0,
    ``B = basis0[i]`` on the first pass), solve the 3-parameter least squares ``d ~ o + m a1 + n a2``
    (normal equations, same 3x3 system for x and y). A pass with fewer than 4 used points or a
    singular system (``|det| <= 1e-9 * trace^3``) stops and keeps the previous ``o, B``. Outputs:
    ``origin = xy[i] + o``, ``basis`` [N, 2, 2], ``rms`` = root mean square of ``|r|`` over the used
    points of the final model (NaN when no pass succeeded), ``n_used`` int64.

``gather_patches(image, xy, size, fill, out) -> uint8[N]``
    ``out`` float32[N, size, size] is filled with a bilinear sample of ``image`` at
    ``(x + c - (size - 1) / 2, y + r - (size - 1) / 2)`` for patch pixel ``(r, c)``; samples
    outside ``[0, W - 1] x [0, H - 1]`` take ``fill``. Returns 1 for patches with such a sample.

``gather_resampled(image, xy, size, weights, fill, center, scale, out) -> uint8[N]``
    ``weights`` float64[M, size] (M >= 1), ``scale`` finite and non-zero. With ``P`` the
    ``gather_patches`` patch of a site in float64 (not rounded to float32), ``out`` float32[N, M, M]
    receives ``(W @ P @ W.T - center) / scale``: a separable linear resampling to M x M px and an
    affine normalisation in one pass. Returns the ``gather_patches`` edge flags.

``knn_within(points, queries, k, radius) -> (dist float64[M, k], idx int64[M, k])``
    ``points`` float64[N, 2], ``queries`` float64[M, 2], ``k >= 1``, ``radius`` finite and > 0.
    For each query the up to ``k`` points with ``dx * dx + dy * dy < radius * radius`` (strictly,
    as ``cKDTree.query(..., distance_upper_bound=radius)``), nearest first, equal distances by
    increasing index; ``dist`` is the square root of that sum. Missing entries: ``inf`` / ``-1``.

``local_references(xy, inv_basis, values, refable, rows, k, tol) -> (median, mad, count, reach)``
    ``xy`` float64[N, 2]; ``inv_basis`` float64[N, 2, 2], the inverse of each site's lattice basis
    (rows ``a1, a2``; NaN where it has none: such a site gets no references); ``values`` float64[N]
    (finite where ``refable``); ``refable`` bool[N]; ``rows`` int64[M] in ``[0, N)``; ``1 <= k <= N``.
    For site ``i = rows[t]``: its ``k`` nearest sites (squared distance ``dx * dx + dy * dy``, ties by
    increasing index; ``i`` itself is one of them), ``reach[t]`` = the square root of the largest
    squared distance among them. Each neighbour ``j != i`` with ``refable[j]``: ``x = xy[j, 0] - xy[i, 0]``,
    ``y = xy[j, 1] - xy[i, 1]``, ``m = x * inv[i, 0, 0] + y * inv[i, 1, 0]``, ``n = x * inv[i, 0, 1] +
    y * inv[i, 1, 1]``; it is a reference of colour ``int(rint(m) - rint(n)) mod 3`` (``rint``: half to
    even; the non-negative remainder) when ``|m - rint(m)| < tol`` and ``|n - rint(n)| < tol``.
    ``median[t, c]``: ``0.5 * (s[(c - 1) // 2] + s[c // 2])`` of the sorted values ``s`` of the
    ``count[t, c]`` references of colour ``c``; ``mad[t, c]`` = ``1.4826 *`` that median of
    ``|v - median[t, c]|``; both NaN when there are none. Outputs float64[M, 3], float64[M, 3],
    int64[M, 3], float64[M].

``neighbour_mean(xy, values, k) -> float64[N, L]``
    ``xy`` float64[N, 2], ``values`` float64[N, L], ``1 <= k <= N``. Row ``i``: the sum of ``values[j]``
    over the ``k`` nearest sites ``j`` of site ``i`` (itself included; ordered as in
    ``local_references``), added one at a time nearest first, divided by ``k``.

``propagate_labels(labels, kids, parents, step) -> None``
    ``labels`` int64[N] (C-contiguous, changed in place); ``kids``, ``parents``, ``step`` int64[M].
    For ``i = 0, 1, ..., M - 1`` in this order: ``labels[kids[i]] = (labels[parents[i]] + step[i]) mod 3``
    (the non-negative remainder). Sequential: a breadth-first walk labels every parent before its
    children. Indices outside ``[0, N)`` are an error (C++: ValueError).

``rvae_forward(x, mask, stn, enc, dec, symmetry, symmetrize, stn_downsample, background_rank, recon) -> (mu, logvar, angle, strength, err)``
    The inference pass of the patch model (:class:`stemfast.model.modules.RVAENet` / ``VAENet`` in
    eval mode) on model inputs ``x`` float32[N, S, S] (``S`` a multiple of 8), each patch first
    taken minus its ``background_rank``-th smallest value (1-based, as ``np.partition`` orders them,
    NaN last; 0: as it is; :func:`stemfast.model.settings.background_rank`), with the weights as
    :func:`stemfast.model.engine.prepare_weights` lays them out:
    ``mask`` float32[S, S]; ``stn`` empty (plain VAE) or ``(w1, b1, w2, b2, kern, kb)`` -- two 3x3
    convolutions on the ``stn_downsample``-pooled masked patch, then ``(C, S) = kb + kern @ h``;
    ``enc`` ``(w1, b1, w2, b2, w3, b3, head_w, head_b)`` -- three 4x4 stride-2 convolutions and a dense
    layer to ``(mu, logvar)``; ``dec`` ``(fc_w, fc_b, w1, b1, w2, b2, w3, b3)`` -- dense + ReLU, three
    (3x3 convolution + 2x pixel shuffle) stages. Convolution weights ``[ky][kx][cin][cout]``, dense
    weights ``[in][out]``, activations channels-last. Angle ``theta = atan2(S, C) / symmetry``
    (degrees); the encoder sees, masked, the patch rotated by ``-theta`` (bilinear, border padding)
    and -- ``symmetrize`` 1 -- averaged with its rotations by ``360 j / symmetry`` (zero padding),
    or -- 2 -- each branch encoded and ``mu`` / ``logvar`` (clamped to [-12, 8]) averaged, or -- 0 --
    branch 0 only; the decoding of ``mu`` is rotated by ``+theta`` (zero padding) and masked; ``err``
    is the mean of the squared difference to the background-subtracted ``x`` over the mask.
    ``recon`` float32[N, S, S] receives the masked reconstruction, or is empty. float32 throughout:
    backends agree to float32 rounding (the background subtraction exactly).
    C++: compiled for the baseline x86-64 ISA, AVX2 + FMA and AVX-512; the widest the CPU runs is
    used, capped by the environment variable ``STEMFAST_MAX_ISA`` (``baseline`` or ``avx2``, read at
    each call; the tests run every variant).

``format_csv_rows(n_rows, columns, kinds, vocabs) -> str``
    The CSV text of ``n_rows`` rows, each ending in ``"\n"``, cells joined by ``","``; column ``c`` is
    ``columns[c]`` [n_rows] formatted by ``kinds[c]``: 0 float64 as Python's ``"%.8g" % v``, 1 as
    ``"%.6g" % v`` (``nan``, ``inf``, ``-inf``, ``-0``), 2 int64 in decimal, 3 uint8 ``1`` / ``0``
    (non-zero / zero), 4 int64 codes into ``vocabs[c]`` (a list of str, cells as they are written),
    5 empty cells (``columns[c]`` unused). The numba backend uses the reference (no printf-style
    formatting in Numba); C++ formats rows in parallel (``std::to_chars`` with the precision, specified
    as printf's ``%.*g`` and correctly rounded like Python's).

``pairs_within(points, radius) -> int64[P, 2]``
    Every pair ``(i, j)``, ``i < j``, with ``dx * dx + dy * dy <= radius * radius`` (at most, as
    ``cKDTree.query_pairs``), sorted by ``i`` then ``j``.
"""

#: Version of the contract above. Bump it whenever a kernel's signature or meaning changes, together
#: with ``kContractVersion`` in csrc/module.cpp: an extension built from older sources (same function
#: names, an older signature) is then not used (:mod:`stemfast.backend` falls back to Numba and says
#: why) instead of failing at its first call. 2: ``rvae_forward`` takes ``background_rank``.
CONTRACT_VERSION = 2
