// pm2 process file for the NATIX SN72 miner.
//
//   pm2 start scripts/pm2/ecosystem.config.js            # start (from the repository root)
//   pm2 logs natix-miner                                   # follow logs
//   pm2 restart natix-miner / pm2 stop natix-miner         # restart / stop (SIGINT, then wait)
//   pm2 delete natix-miner                                 # forget it
//   pm2 save && pm2 startup                                # survive reboots
//
// Settings come from the environment so one file serves every machine:
//   NATIX_WALLET=miner NATIX_HOTKEY=default NATIX_PORT=8091 NATIX_NETWORK=finney NATIX_NETUID=72 \
//   NATIX_CONFIG=configs/cpu.yaml pm2 start scripts/pm2/ecosystem.config.js
// After changing them: pm2 restart scripts/pm2/ecosystem.config.js --update-env
const path = require("path");

const root = path.resolve(__dirname, "..", "..");
const env = process.env;
const args = [
  "--netuid", env.NATIX_NETUID || "72",
  "--subtensor.network", env.NATIX_NETWORK || "finney",
  "--wallet.name", env.NATIX_WALLET || "default",
  "--wallet.hotkey", env.NATIX_HOTKEY || "default",
  "--axon.port", env.NATIX_PORT || "8091",
  "--config", env.NATIX_CONFIG || "configs/cpu.yaml",
];
if (env.NATIX_EXTERNAL_IP) args.push("--axon.external_ip", env.NATIX_EXTERNAL_IP);
if (env.NATIX_DEBUG) args.push("--logging.debug");

module.exports = {
  apps: [
    {
      name: env.NATIX_PM2_NAME || "natix-miner",
      cwd: root,
      script: path.join(root, "neurons", "miner.py"),
      interpreter: path.join(root, ".venv", "bin", "python"),
      args: args,
      autorestart: true,
      // A start-up error (exit 1: not registered / port taken; exit 2: config or missing head)
      // will not fix itself: stop after a few quick failures instead of spinning.
      max_restarts: 10,
      min_uptime: "60s",
      restart_delay: 5000,
      exp_backoff_restart_delay: 2000,
      // pm2 stop sends SIGINT; the miner then stops the axon (port released) and the engine.
      kill_timeout: 20000,
      out_file: path.join(root, "runs", "pm2", "miner.out.log"),
      error_file: path.join(root, "runs", "pm2", "miner.err.log"),
      merge_logs: true,
      time: true,
      env: {
        PYTHONUNBUFFERED: "1",
        HF_HUB_OFFLINE: env.HF_HUB_OFFLINE || "1",
      },
    },
  ],
};
