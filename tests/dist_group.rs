//! The process group on 127.0.0.1: two ranks as two threads of this test.
use std::time::Duration;

use cifar_fast::dist::{Launch, ProcessGroup};
use tch::{Device, Tensor};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
