"""The proof's defaults, in one place: every run that proves a winner against the baseline (a benchmark tune, a
live tune, ``apply``, ``fleet finish``) and every command line that offers these knobs reads them here, so the
paths cannot drift apart. A module of constants only: the command line's parser imports it."""

ALPHA = 0.05  # level of the one-sided "candidate is faster" test, before the correction for several candidates
MIN_EFFECT = 0.01  # the smallest speed-up worth a configuration change (1 %)
CANDIDATES = 3  # the best trials measured again against the baseline
BENCHMARK_VERIFY_SAMPLES = 5  # measurements per benchmark verification run
LIVE_VERIFY_WINDOWS = 3  # workload windows per live verification run
# A candidate whose server took longer than this many times the baseline's load (and LOAD_SLACK_S more) to come
# up healthy is not proven: a faster token rate must not hide a start ten times slower (repacking, load modes).
MAX_LOAD_FACTOR = 3.0
LOAD_SLACK_S = 5.0  # small models load in under a second, and a busy host adds seconds of noise
# Interleaved proof rounds (a run of every arm each): fewer give no verdict worth writing; the proof takes what the
# budget leaves, up to MAX_ROUNDS, or up to --max-rounds where each round's restarts cost more than its precision
# is worth (a live host behind a load balancer; a test run).
MIN_ROUNDS = 3
MAX_ROUNDS = 8
RESERVE_MAX_FRACTION = 0.4  # the most of a budget the proof may reserve when a search shares it
