/* The DPDK headers that clonecluster binds. Keep this list small: every header added here grows
 * the generated bindings and the set of static-inline wrappers compiled by build.rs. */
#include <rte_config.h>
#include <rte_version.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_cycles.h>
#include <rte_mempool.h>
#include <rte_mbuf.h>
#include <rte_ethdev.h>
#include <rte_ring.h>
#include <rte_interrupts.h>
#include <rte_epoll.h>
#include <rte_prefetch.h>

/* rte_errno is a per-lcore thread-local macro: not reachable through bindgen. */
int clonecluster_rte_errno(void);
