//! The process group on 127.0.0.1: two ranks as two threads of this test, or one rank here and
//! one in Python.
mod common;

use std::time::Duration;

use cifar_fast::dist::{Launch, ProcessGroup};
use tch::{Device, Tensor, nn};

/// Below the ephemeral range, where Gloo's own listeners cannot take it first.
fn free_port() -> u16 {
    cifar_fast::dist::launch::free_port().unwrap()
}

fn launch(rank: usize, world: usize, port: u16) -> Launch {
    Launch {
        rank,
        world,
        local_rank: rank,
        local_world: world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        agent_store: false,
        attempt: 0,
    }
}

/// Runs `body(group)` on `world` ranks at once, returning each rank's result in rank order.
fn on_ranks<T: Send + 'static>(world: usize, body: fn(ProcessGroup) -> T) -> Vec<T> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|r| {
            std::thread::spawn(move || {
                body(
                    ProcessGroup::join(&launch(r, world, port), Device::Cpu, Duration::from_secs(20))
                        .unwrap(),
                )
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn all_reduce_sums_and_broadcast_copies_rank_0() {
    let got = on_ranks(2, |g| {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]) * (g.rank() as f64 + 1.0);
        g.all_reduce_sum(&t).unwrap();
        let b = Tensor::from_slice(&[g.rank() as f32 + 10.0]);
        g.broadcast(&b, 0).unwrap();
        (Vec::<f32>::try_from(&t).unwrap(), Vec::<f32>::try_from(&b).unwrap())
    });
    for (sum, b) in got {
        assert_eq!(sum, [3.0, 6.0, 9.0]);
        assert_eq!(b, [10.0]);
    }
}

#[test]
fn average_gradients_gives_every_rank_the_mean_and_broadcast_weights_rank_0s() {
    let got = on_ranks(2, |g| {
        // Different initial weights on each rank, made equal by the broadcast.
        tch::manual_seed(g.rank() as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root() / "fc", 4, 2, Default::default());
        // A variable this rank's loss does not reach: its gradient counts as zeros.
        let unused = vs.root().var("unused", &[3], nn::Init::Const(1.0));
        g.broadcast_weights(&vs).unwrap();
        let x = Tensor::full([5, 4], g.rank() as f64 + 1.0, (tch::Kind::Float, Device::Cpu));
        let mut loss = nn::Module::forward(&lin, &x).sum(tch::Kind::Float);
        if g.rank() == 1 {
            loss += unused.sum(tch::Kind::Float) * 2.0;
        }
        loss.backward();
        g.average_gradients(&vs).unwrap();
        let vars = vs.variables();
        let grad = |n: &str| Vec::<f32>::try_from(vars[n].grad().flatten(0, -1)).unwrap();
        let value = |n: &str| Vec::<f32>::try_from(vars[n].flatten(0, -1)).unwrap();
        (value("fc.weight"), grad("fc.weight"), grad("fc.bias"), grad("unused"))
    });
    assert_eq!(got[0].0, got[1].0, "weights differ after the broadcast");
    for (_, w, b, unused) in &got {
        // d(sum of outputs)/dW = sum of inputs over the batch: 5·1 and 5·2, averaged 7.5.
        assert!(w.iter().all(|&v| v == 7.5), "{w:?}");
        assert!(b.iter().all(|&v| v == 5.0), "{b:?}");
        assert!(unused.iter().all(|&v| v == 1.0), "{unused:?}");
    }
}

#[test]
fn the_launch_is_read_from_torchruns_and_slurms_variables_and_bad_ones_are_named() {
    let from = |vars: &[(&str, &str)]| {
        let map: std::collections::HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|k| map.get(k).cloned())
    };
    assert_eq!(from(&[]).unwrap(), None);
    let torchrun = [
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29400"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
    ];
    let l = from(&torchrun).unwrap().unwrap();
    assert_eq!((l.rank, l.world, l.local_rank, l.local_world), (3, 4, 1, 2));
    assert_eq!((l.master_addr.as_str(), l.master_port, l.agent_store, l.attempt), ("node0", 29400, true, 2));
    assert_eq!(l.device(Device::Cuda(0)), Device::Cuda(1));
    assert_eq!(l.device(Device::Cpu), Device::Cpu);

    let slurm = [
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NTASKS_PER_NODE", "2(x4)"),
        ("MASTER_ADDR", "n1"),
    ];
    let l = from(&slurm).unwrap().unwrap();
    assert_eq!((l.rank, l.world, l.local_rank, l.local_world, l.master_port), (5, 8, 1, 2, 29500));
    // One Slurm task is one process.
    assert_eq!(from(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap(), None);

    for (change, named) in [
        (("RANK", "x"), "RANK=\"x\""),
        (("RANK", "4"), "RANK 4 is not below WORLD_SIZE 4"),
        (("MASTER_PORT", "70000"), "MASTER_PORT=\"70000\""),
        (("MASTER_ADDR", ""), "MASTER_ADDR is not set"),
        (("LOCAL_RANK", "2"), "LOCAL_RANK 2 is not below LOCAL_WORLD_SIZE 2"),
    ] {
        let vars: Vec<(&str, &str)> =
            torchrun.iter().map(|&(k, v)| if k == change.0 { (k, change.1) } else { (k, v) }).collect();
        let e = from(&vars).unwrap_err().to_string();
        assert!(e.contains(named), "{change:?}: {e}");
    }
}

#[test]
fn a_python_rank_joins_the_group_as_torch_distributed_makes_it() {
    let port = free_port();
    // The script ends as PyTorch's documentation asks a distributed script to: without
    // `destroy_process_group`, a Gloo worker thread may free its last tensor while the
    // interpreter is finalising and abort the process (pytorch/pytorch#179291), as this test's
    // Python rank did now and then.
    let script = r#"
import datetime, torch, torch.distributed as dist
dist.init_process_group("gloo", rank=1, world_size=2, timeout=datetime.timedelta(seconds=60))
t = torch.tensor([1.0, 2.0, 3.0])
dist.all_reduce(t)
b = torch.zeros(2)
dist.broadcast(b, 0)
print(t.tolist(), b.tolist())
dist.destroy_process_group()
"#;
    let python = std::process::Command::new(common::python())
        .args(["-c", script])
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let g = ProcessGroup::join(&launch(0, 2, port), Device::Cpu, Duration::from_secs(60)).unwrap();
    let t = Tensor::from_slice(&[10.0f32, 20.0, 30.0]);
    g.all_reduce_sum(&t).unwrap();
    g.broadcast(&Tensor::from_slice(&[7.0f32, 8.0]), 0).unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [11.0, 22.0, 33.0]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[11.0, 22.0, 33.0] [7.0, 8.0]");
}

#[test]
fn the_same_exchange_made_again_reads_the_new_values_not_the_last_ones() {
    let got = on_ranks(2, |g| {
        let first = g.exchange("settings", Ok(format!("a{}", g.rank()))).unwrap();
        // Rank 1 comes to the second exchange late: rank 0 must wait for its new value.
        if g.rank() == 1 {
            std::thread::sleep(Duration::from_millis(500));
        }
        let second = g.exchange("settings", Ok(format!("b{}", g.rank()))).unwrap();
        (first, second)
    });
    for (first, second) in got {
        assert_eq!(first, ["a0", "a1"]);
        assert_eq!(second, ["b0", "b1"]);
    }
}
