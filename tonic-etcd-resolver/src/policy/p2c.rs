//! Least-loaded power-of-two-choices: two distinct random candidates, the less loaded wins.

/// One candidate's load as p2c sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Load {
    /// RPCs in flight to it through this channel.
    pub(crate) in_flight: usize,
    /// Its weight (1 when weights are ignored).
    pub(crate) weight: u32,
}

/// Whether `a` is no more loaded than `b`: `(in_flight + 1) / weight`, compared without
/// division. The `+ 1` makes a heavier idle endpoint win over a lighter idle one.
pub(crate) fn prefer_first(a: Load, b: Load) -> bool {
    let cost = |x: Load, other: Load| (x.in_flight as u128 + 1) * u128::from(other.weight.max(1));
    cost(a, b) <= cost(b, a)
}

/// The index of the chosen candidate among `n`, with `random(k)` drawing from `0..k`.
pub(crate) fn choose(
    n: usize,
    mut load: impl FnMut(usize) -> Load,
    mut random: impl FnMut(usize) -> usize,
) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = random(n);
            // A second index distinct from the first.
            let b = (a + 1 + random(n - 1)) % n;
            Some(if prefer_first(load(a), load(b)) { a } else { b })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(in_flight: usize) -> Load {
        Load {
            in_flight,
            weight: 1,
        }
    }

    #[test]
    fn the_less_loaded_of_the_two_draws_wins() {
        let loads = [5, 0, 9];
        let mut draws = [0, 0].into_iter();
        // Draws 0, then (0 + 1 + 0) % 3 = 1: endpoints 0 and 1, and 1 has less in flight.
        let chosen = choose(3, |i| load(loads[i]), |_| draws.next().unwrap());
        assert_eq!(chosen, Some(1));
    }

    #[test]
    fn the_two_draws_are_always_distinct() {
        for n in 2..6 {
            for first in 0..n {
                for second in 0..n - 1 {
                    let mut draws = [first, second].into_iter();
                    let mut seen = Vec::new();
                    choose(
                        n,
                        |i| {
                            seen.push(i);
                            load(0)
                        },
                        |_| draws.next().unwrap(),
                    );
                    assert_ne!(seen[0], seen[1], "n {n}, draws {first} {second}");
                }
            }
        }
    }

    #[test]
    fn a_heavier_endpoint_takes_proportionally_more_in_flight() {
        let heavy = Load {
            in_flight: 3,
            weight: 200,
        };
        let light = Load {
            in_flight: 1,
            weight: 100,
        };
        // (3 + 1) / 200 = 0.02 < (1 + 1) / 100 = 0.02: a tie goes to the first.
        assert!(prefer_first(heavy, light));
        let busier = Load {
            in_flight: 4,
            ..heavy
        };
        assert!(!prefer_first(busier, light));
    }

    #[test]
    fn one_or_no_candidate_needs_no_draw() {
        let never = |_: usize| -> usize { panic!("no draw expected") };
        assert_eq!(choose(0, load, never), None);
        assert_eq!(choose(1, load, never), Some(0));
    }

    #[test]
    fn a_stuck_endpoint_loses_every_draw_it_is_in() {
        let loads = [100, 0, 0];
        let mut rng = fastrand::Rng::with_seed(7);
        let picks: Vec<usize> = (0..1000)
            .filter_map(|_| choose(3, |i| load(loads[i]), |k| rng.usize(..k)))
            .collect();
        assert!(picks.iter().all(|i| *i != 0));
        assert!(picks.contains(&1) && picks.contains(&2));
    }
}
