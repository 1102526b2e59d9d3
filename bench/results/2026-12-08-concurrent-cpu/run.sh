cd /work/main
for cfg in learn local; do for c in 1 2; do
  rm -rf /tmp/cc/$cfg-c$c
  /usr/bin/time -f "%e s wall" env MECPE_DATA=../shared/data/ecf .venv/bin/mecpe pipeline --config jobs/configs/$cfg.yaml output_dir=/tmp/cc/$cfg-c$c/out storage.path=/tmp/cc/$cfg-c$c/runs scaling.concurrent_trainings=$c > /tmp/cc/$cfg-c$c.log 2>&1
  tail -1 /tmp/cc/$cfg-c$c.log
done; done
echo done
