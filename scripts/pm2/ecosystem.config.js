// pm2 process file for the NATIX SN72 miner: live on the chain, or (NATIX_LOCAL=1) chain-free.
//
//   pm2 start scripts/pm2/ecosystem.config.js              # live (from the repository root)
//   NATIX_LOCAL=1 NATIX_ALLOW_HOTKEY=5... pm2 start scripts/pm2/ecosystem.config.js
//                                                          # "natix-miner-local": no chain, 127.0.0.1
//   pm2 logs natix-miner                                   # follow logs (also runs/pm2/*.log)
//   pm2 restart natix-miner / pm2 stop natix-miner         # restart / stop (SIGINT, then wait)
//   pm2 delete natix-miner                                 # forget it
//   pm2 save && pm2 startup                                # survive reboots
//
// Settings come from the environment so one file serves every machine:
//   NATIX_WALLET=miner NATIX_HOTKEY=default NATIX_WALLET_PATH=~/.bittensor/wallets \
//   NATIX_NETWORK=finney NATIX_CHAIN_ENDPOINT=wss://... NATIX_NETUID=72 NATIX_PORT=8091 \
//   NATIX_CONFIG=configs/cpu.yaml pm2 start scripts/pm2/ecosystem.config.js
// The local app admits only NATIX_ALLOW_HOTKEY (the ss58 of the client you test with) and answers
// as the NATIX_WALLET* wallet when one is set, else as a throwaway hotkey (printed in its log).
// After changing them: pm2 restart scripts/pm2/ecosystem.config.js --update-env
//
// Did pm2 give up? A start-up error (exit 1: chain unreachable, not registered, port taken;
// exit 2: a flag, the config, the wallet or a trained head is wrong) does not fix itself, so pm2
// stops restarting after `max_restarts` starts that each died within `min_uptime`. Then
// `pm2 ls` shows status "errored" and the restart count (↺), `pm2 describe natix-miner` shows
// "restarts" and "unstable restarts", and the reason is the last lines of
// `pm2 logs natix-miner --err --lines 20`. Fix it, then `pm2 restart natix-miner`.
const path = require("path");

const root = path.resolve(__dirname, "..", "..");
const env = process.env;

function common() {
  const args = ["--config", env.NATIX_CONFIG || "configs/cpu.yaml"];
  if (env.NATIX_DEBUG) args.push("--logging.debug");
  return args;
}

function walletArgs() {
  const args = [];
  if (env.NATIX_WALLET) args.push("--wallet.name", env.NATIX_WALLET);
  if (env.NATIX_HOTKEY) args.push("--wallet.hotkey", env.NATIX_HOTKEY);
  if (env.NATIX_WALLET_PATH) args.push("--wallet.path", env.NATIX_WALLET_PATH);
  return args;
}

const liveArgs = [
  ...common(),
  "--netuid", env.NATIX_NETUID || "72",
  "--subtensor.network", env.NATIX_NETWORK || "finney",
  "--wallet.name", env.NATIX_WALLET || "default",
  "--wallet.hotkey", env.NATIX_HOTKEY || "default",
  "--axon.port", env.NATIX_PORT || "8091",
];
if (env.NATIX_WALLET_PATH) liveArgs.push("--wallet.path", env.NATIX_WALLET_PATH);
if (env.NATIX_CHAIN_ENDPOINT) liveArgs.push("--subtensor.chain_endpoint", env.NATIX_CHAIN_ENDPOINT);
if (env.NATIX_EXTERNAL_IP) liveArgs.push("--axon.external_ip", env.NATIX_EXTERNAL_IP);

const localArgs = [...common(), "--local", "--axon.port", env.NATIX_PORT || "8091", ...walletArgs()];
if (env.NATIX_ALLOW_HOTKEY) localArgs.push("--allow-hotkey", env.NATIX_ALLOW_HOTKEY);

function app(name, args) {
  return {
    name: name,
    cwd: root,
    script: path.join(root, "neurons", "miner.py"),
    interpreter: path.join(root, ".venv", "bin", "python"),
    args: args,
    autorestart: true,
    // Give up after 10 starts in a row that each died within 60 s (see "Did pm2 give up?").
    max_restarts: 10,
    min_uptime: "60s",
    restart_delay: 5000,
    exp_backoff_restart_delay: 2000,
    // pm2 stop sends SIGINT; the miner then stops the axon (port released) and the engine.
    kill_timeout: 20000,
    out_file: path.join(root, "runs", "pm2", `${name}.out.log`),
    error_file: path.join(root, "runs", "pm2", `${name}.err.log`),
    merge_logs: true,
    time: true,
    env: {
      PYTHONUNBUFFERED: "1",
      HF_HUB_OFFLINE: env.HF_HUB_OFFLINE || "1",
      // No colour codes in the log files (the miner also strips bittensor's when not on a tty).
      NO_COLOR: "1",
    },
  };
}

const local = ["1", "true", "yes"].includes((env.NATIX_LOCAL || "").toLowerCase());

module.exports = {
  apps: [local ? app(env.NATIX_PM2_NAME || "natix-miner-local", localArgs)
               : app(env.NATIX_PM2_NAME || "natix-miner", liveArgs)],
};
