#include "wrapper.h"

int clonecluster_rte_errno(void) { return rte_errno; }
