#!/usr/bin/env bash
# What every new Ray worker process of mecpe pays in imports before it does any work (issue #27: the suite starts
# dozens of training workers and predictor actors). Prints one row per import set, 3 fresh processes each (median).
#   bash bench/import_floor.sh [PYTHON]      (default .venv/bin/python)
py=${1:-.venv/bin/python}
printf '| imports | median s (3 runs) |\n|---|---|\n'
for m in "ray" "mecpe.train.recipe" "mecpe.infer.stages, mecpe.predict, peft" "mecpe.train.recipe, peft, trl.trainer.sft_trainer"; do
  t=$(for i in 1 2 3; do /usr/bin/time -f "%e" "$py" -c "import $m" 2>&1 | tail -1; done | sort -n | sed -n 2p)
  printf '| %s | %s |\n' "$m" "$t"
done
