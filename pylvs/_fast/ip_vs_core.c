/* The per-frame pipeline (the kernel's ip_vs_core.c): parse and check a
 * frame, find its conn (or make one on the miss path, which calls the Python
 * scheduler), update the TCP state, hand it to the conn's transmitter (NAT
 * or DR, bound when the conn was made), give the verdict. See
 * docs/engine.md "Per frame". The established path is one function with
 * everything it calls inlined (HOT); the miss path is out of line.
 */
#include "ip_vs.h"

#include "ip_vs_xmit_dr.h"
#include "ip_vs_xmit_nat.h"
#include "ip_vs_xmit_tun.h"

/* --- the frame path ------------------------------------------------------- */

/* One packet of `bytes` (IP length) for the conn's service and dest, in the
 * given direction's columns (T_INPKTS/T_INBYTES or T_OUTPKTS/T_OUTBYTES). */
HOT void count_traffic(PylvsEngine *e, const struct conn *c, int pkts, int bytes_col,
                       uint32_t bytes)
{
    e->svc_stats[c->svc][pkts] += 1;
    e->svc_stats[c->svc][bytes_col] += bytes;
    e->dest_stats[c->dest][pkts] += 1;
    e->dest_stats[c->dest][bytes_col] += bytes;
}

HOT void conn_set_state(PylvsEngine *e, struct conn *c, int dir, uint8_t tcpflags,
                        double now)
{
    uint8_t old = c->state, new_ = old;
    if (c->proto == PROTO_TCP) {
        int ev = tcp_event(tcpflags);
        if (ev >= 0 && old < N_TCP_STATES)
            new_ = e->trans[dir][ev][old];
    } else {
        new_ = UDP_STATE;
    }
    if (state_active(old) != state_active(new_)) {
        int32_t v = state_active(new_) ? 1 : -1;
        dest_conns_add(e, c->dest, C_ACTIVE, v);
        dest_conns_add(e, c->dest, C_INACTIVE, -v);
    }
    c->state = new_;
    c->expires = now + e->timeouts[new_];
    if (dir == DIR_OUTPUT)
        c->replied = 1;
    else
        c->in_pkts++;
    /* ip_vs_control_assure_ct: TCP on reaching ESTABLISHED, UDP on a reply. */
    if (c->control != 0 &&
        (c->proto == PROTO_TCP ? new_ == S_ESTABLISHED && old != S_ESTABLISHED : dir == DIR_OUTPUT))
        e->conns[c->control - 1].state |= CTPL_S_ASSURED;
}

static int find_service_exact(const PylvsEngine *e, uint8_t proto, uint32_t vaddr,
                              uint16_t vport);

/* ip_vs.h: the kernel's ip_vs_service_find, with its "catch-all port". */
int find_service(const PylvsEngine *e, uint8_t proto, uint32_t vaddr, uint16_t vport)
{
    int s = find_service_exact(e, proto, vaddr, vport);
    if (s < 0 && e->nullsvc != 0 && vport != 0)
        s = find_service_exact(e, proto, vaddr, 0);
    return s;
}

/* One probe run in the hash set_tables built, whatever the number of
 * services. */
static int find_service_exact(const PylvsEngine *e, uint8_t proto, uint32_t vaddr,
                              uint16_t vport)
{
    if (e->svc_hash == NULL)
        return -1;
    uint32_t i = (uint32_t)svc_key_hash(e, proto, vaddr, vport) & e->svc_mask;
    for (;;) {
        int32_t s = e->svc_hash[i];
        if (s < 0)
            return -1;
        const svc_row *r = &e->services[s];
        if (r->proto == proto && r->vaddr == vaddr && r->vport == vport)
            return s;
        i = (i + 1) & e->svc_mask;
    }
}

/* The conn's dest while it is still the one the conn was made for (a dest
 * deleted, or its slot reused by another service's, is gone), else NULL. */
HOT const dest_row *conn_dest(const PylvsEngine *e, const struct conn *c)
{
    if (c->dest >= e->ndests)
        return NULL;
    const dest_row *dest = &e->dests[c->dest];
    return (dest->flags & DEST_F_USED) && dest->svc == c->svc ? dest : NULL;
}

/* ip_vs.h; a scan of every slot, as the kernel's flush walks its table. A
 * template that still controls conns is passed over and goes with the last
 * of them (ip_vs_expire_nodest_conn_flush), so no conn names a freed slot. */
long conn_expire_nodest(PylvsEngine *e)
{
    long n = 0;
    for (uint32_t slot = 0; slot < e->high; slot++) {
        const struct conn *c = &e->conns[slot];
        if (!c->used || conn_dest(e, c) != NULL)
            continue;
        if ((c->flags & CONN_F_TEMPLATE) && c->control != 0)
            continue;
        uint32_t tpl = (c->flags & CONN_F_TEMPLATE) ? 0 : c->control;
        conn_remove(e, slot, ST_CONNS_EXPIRED);
        n++;
        if (tpl != 0 && e->conns[tpl - 1].control == 0 && tpl - 1 < slot) {
            conn_remove(e, tpl - 1, ST_CONNS_EXPIRED);
            n++;
        }
    }
    return n;
}

/* May a TCP segment that matches no conn make one (step 9)? A SYN without
 * ACK or RST; with sloppy_tcp any segment but a RST, as the kernel's
 * tcp_conn_schedule, so a director taking over running flows (after a
 * failover) serves them from their next segment. */
HOT int tcp_may_open(const PylvsEngine *e, uint8_t tcpflags)
{
    if (tcpflags & TH_RST)
        return 0;
    return e->sysctl[SYS_SLOPPY_TCP] || (tcpflags & (TH_SYN | TH_ACK)) == TH_SYN;
}

/* drop_packet (the kernel's ip_vs_todrop): with a rate set by control, one
 * in every `drop_rate` new-flow packets is dropped. */
static int defense_todrop(PylvsEngine *e)
{
    if (--e->drop_counter > 0)
        return 0;
    e->drop_counter = e->drop_rate;
    return 1;
}

/* A one-packet conn made by the frame just processed leaves the table now,
 * as the kernel's ip_vs_conn_put expires an OPS conn at once. */
static __attribute__((noinline)) void ops_done(PylvsEngine *e)
{
    uint32_t slot = e->ops_slot;
    e->ops_slot = NO_SLOT;
    if (e->conns[slot].used)
        conn_remove(e, slot, ST_CONNS_EXPIRED);
}

/* A segment that would open a conn on a miss (step 8): the kernel's
 * is_new_conn is the SYN bit alone, but a SYN with ACK or RST never makes a
 * conn here, so it must not end one either. */
HOT int is_new_conn(uint8_t proto, uint8_t tcpflags)
{
    return proto == PROTO_TCP && (tcpflags & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN;
}

#define IN_KEEP 0    /* go on with the conn */
#define IN_RESCHED 1 /* the conn is gone: schedule the frame afresh */
#define IN_DROPPED 2 /* the frame is dropped (counted) */

/* The kernel's ip_vs_in rules for a live conn found by an IN lookup, in its
 * order (there is no conntrack here, so a rescheduled packet is never
 * dropped for an old conntrack entry):
 * 1. A SYN (is_new_conn): with
 *    expire_nodest_conn and the dest's weight 0, or with conn_reuse_mode
 *    and the conn in TIME_WAIT or CLOSE (or, with bit 2 of the mode, in
 *    FIN_WAIT without a reply: is_new_conn_expected), the conn is expired
 *    (conns_reused) and the SYN scheduled afresh.
 * 2. The dest is gone (IP_VS_DEST_F_AVAILABLE cleared): with
 *    expire_nodest_conn the conn is expired (conns_expired) and the frame
 *    handled as a miss; without, the frame is dropped and the conn left as
 *    it was (drop_dest_gone). */
static __attribute__((noinline)) int
conn_in_rules(PylvsEngine *e, uint32_t slot, uint8_t proto, uint8_t tcpflags)
{
    struct conn *c = &e->conns[slot];
    int dest_ok = conn_dest(e, c) != NULL;
    int64_t nodest = e->sysctl[SYS_EXPIRE_NODEST_CONN], reuse = e->sysctl[SYS_CONN_REUSE_MODE];
    if (is_new_conn(proto, tcpflags)) {
        int resched = 0;
        if (nodest && dest_ok && e->dests[c->dest].weight == 0)
            resched = 1;
        else if (reuse)
            resched = c->state == S_TIME_WAIT || c->state == S_CLOSE ||
                      ((reuse & 2) && c->state == S_FIN_WAIT && !c->replied);
        if (resched) {
            conn_remove(e, slot, ST_CONNS_REUSED);
            return IN_RESCHED;
        }
    }
    if (dest_ok)
        return IN_KEEP;
    if (nodest) {
        conn_remove(e, slot, ST_CONNS_EXPIRED);
        return IN_RESCHED;
    }
    e->stats[ST_DROP_DEST_GONE]++;
    return IN_DROPPED;
}

static long call_schedule_gil(PylvsEngine *e, int svc, uint32_t caddr, uint16_t cport);
static int upcall_limited(const PylvsEngine *e);
static int upcall_allowed(PylvsEngine *e, double now);

/* call_schedule's answer when the upcall limit turns the frame away. */
#define SCHED_LIMITED (-3)

/* The dest for a new conn of the service: its C scheduler's pick when it
 * has one (ip_vs_sched.c), else the Python scheduler's, if the upcall limit
 * lets it run (so neither a C pick nor a persistence template's hit is ever
 * metered). Returns the slot, -1 for none, -2 when Python raised (already
 * reported), or SCHED_LIMITED. */
static long call_schedule(PylvsEngine *e, int svc, uint32_t caddr, uint16_t cport, double now)
{
    long picked = sched_pick(e, svc, caddr, cport);
    if (picked != SCHED_ASK_PYTHON)
        return picked;
    if (e->schedule == NULL)
        return -1;
    if (upcall_limited(e) && !upcall_allowed(e, now))
        return SCHED_LIMITED;
    /* forward() runs without the GIL: take it for the upcall only. */
    e->upcalls++;
    PyThreadState *ts = e->nogil;
    if (ts != NULL) {
        e->nogil = NULL;
        PyEval_RestoreThread(ts);
    }
    long r = call_schedule_gil(e, svc, caddr, cport);
    if (ts != NULL)
        e->nogil = PyEval_SaveThread();
    return r;
}

static long call_schedule_gil(PylvsEngine *e, int svc, uint32_t caddr, uint16_t cport)
{
    PyObject *args[3];
    args[0] = PyLong_FromLong(svc);
    args[1] = PyLong_FromUnsignedLong(caddr);
    args[2] = PyLong_FromLong(cport);
    PyObject *res = NULL;
    long d = -1;
    int overflow = 0;
    if (args[0] && args[1] && args[2]) {
        PyObject *sched = e->schedule;
        Py_INCREF(sched);
        e->busy = 1;
        res = PyObject_Vectorcall(sched, args, 3, NULL);
        /* Reading the answer may run Python too (__index__, __del__). */
        if (res != NULL) {
            d = PyLong_AsLongAndOverflow(res, &overflow);
            Py_DECREF(res);
        }
        e->busy = 0;
        Py_DECREF(sched);
    }
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    Py_XDECREF(args[2]);
    if (res != NULL) {
        if (overflow)
            return -1; /* no dest has such a slot */
        if (!(d == -1 && PyErr_Occurred()))
            return d < 0 ? -1 : d;
    }
    PyErr_WriteUnraisable(e->schedule ? e->schedule : Py_None);
    return -2;
}

/* --- persistence (docs/engine.md, "Persistence") -------------------------- */

/* The port a new conn to `dest` goes to: the dest's, unless it is 0 or the
 * frame came to another port than the service's (a port-0 service), when
 * the frame's stays (the kernel's ip_vs_sched_persist and ip_vs_schedule). */
static uint16_t conn_dport(const svc_row *svc, const dest_row *dest, uint16_t dport)
{
    return dest->dport != 0 && dport == svc->vport ? dest->dport : dport;
}

/* ip_vs_check_template: the template's dest is still the one it was made
 * for (not deleted), of this service, and not quiescent (weight 0) while
 * expire_quiescent_template is set. An invalid one leaves the index and
 * lives on, unused, until its timer (conn_unhash). */
static int tpl_valid(PylvsEngine *e, uint32_t slot, int s)
{
    const struct conn *t = &e->conns[slot];
    const dest_row *dest = conn_dest(e, t);
    if (dest != NULL && t->svc == (uint16_t)s &&
        !(e->sysctl[SYS_EXPIRE_QUIESCENT_TEMPLATE] && dest->weight == 0))
        return 1;
    conn_unhash(e, slot);
    return 0;
}

/* A conn to replace at the limit, or -1, never `keep`: the template the
 * new conn will name counts as controlling it already while the draw runs
 * (class -1, not dead). */
static int64_t victim_but(PylvsEngine *e, double now, uint32_t keep)
{
    if (!conn_table_full(e))
        return -1;
    e->conns[keep].control++;
    int64_t v = conn_victim(e, now);
    e->conns[keep].control--;
    return v;
}

/* What a new conn or template takes from its key and its dest. */
static void conn_fill(struct conn *c, uint8_t proto, uint32_t caddr, uint16_t cport,
                      uint32_t vaddr, uint16_t vport, const dest_row *dest, uint16_t dport,
                      int s, long d)
{
    c->proto = proto;
    c->caddr = caddr;
    c->cport = cport;
    c->vaddr = vaddr;
    c->vport = vport;
    c->daddr = dest->daddr;
    c->dport = dport;
    c->fwd = dest->fwd;
    c->svc = (uint16_t)s;
    c->dest = (uint32_t)d;
}

/* A new template of service s for dest d in a free slot (or `victim`'s);
 * NO_SLOT when none is had. Its timer is set by the caller. */
static uint32_t tpl_new(PylvsEngine *e, int s, long d, uint8_t tproto, uint32_t snet,
                        uint32_t vaddr, uint16_t tvport, uint16_t tdport, uint64_t h,
                        int64_t victim, double now)
{
    uint32_t slot = conn_alloc(e, victim, now);
    if (slot == NO_SLOT)
        return NO_SLOT;
    struct conn *t = &e->conns[slot];
    memset(t, 0, sizeof(*t));
    conn_fill(t, tproto, snet, 0, vaddr, tvport, &e->dests[d], tdport, s, d);
    t->xmit = XMIT_NONE;
    t->flags = CONN_F_TEMPLATE;
    sync_conn_init(t, now);
    t->tpl_timeout = e->services[s].timeout;
    t->expires = now + t->tpl_timeout;
    t->used = 1;
    index_insert(e, h, slot, KEY_IN);
    e->conn_count++;
    e->stats[ST_CONNS_CREATED]++;
    dest_persist_add(e, (uint32_t)d, 1);
    dest_overload_bind(e, (uint32_t)d); /* ip_vs_bind_dest checks templates too */
    return slot;
}

/* The dest of a new conn of service s (conn_new's one call for it). A
 * persistent service (timeout > 0) looks up the client's template, keyed
 * (proto, caddr & netmask, cport 0, vaddr, vport; vport 0 for a port-0
 * service, whose frames come to other ports, and for FTP), and takes its
 * dest while it is valid; otherwise the scheduler chooses and a template
 * is made for the choice. Either way the template's timer starts again
 * (ip_vs_conn_put). *ct gets its slot for persist_bind (NO_SLOT: none). At
 * the limit a new template takes *victim's place and *victim is drawn
 * again for the conn. A non-persistent service takes only frames to its
 * own port. Returns as call_schedule. */
static long persist_dest(PylvsEngine *e, int s, uint8_t proto, uint32_t saddr, uint16_t sport,
                         uint32_t daddr, uint16_t dport, double now, int64_t *victim,
                         uint32_t *ct)
{
    const svc_row *svc = &e->services[s];
    *ct = NO_SLOT;
    if (svc->timeout == 0)
        return svc->vport == dport ? call_schedule(e, s, saddr, sport, now) : -1;
    int whole = dport == svc->vport && svc->vport != FTP_PORT;
    uint8_t tproto = proto | TPL_PROTO;
    uint32_t snet = saddr & svc->netmask;
    uint16_t tvport = whole ? dport : 0;
    uint64_t h = key_hash(e, tproto, snet, 0, daddr, tvport);
    struct bucket *b = index_find(e, h, tproto, snet, 0, daddr, tvport);
    uint32_t slot = b != NULL ? (b->ref - 1) >> 1 : NO_SLOT;
    if (slot != NO_SLOT && e->conns[slot].expires <= now) {
        /* Its timer fired before the clock hand came: as the hand would. */
        if (tpl_held(&e->conns[slot])) {
            e->conns[slot].tpl_timeout = TPL_LATE_TIMEOUT;
        } else {
            conn_remove(e, slot, ST_CONNS_EXPIRED);
            slot = NO_SLOT;
        }
    }
    long d;
    if (slot != NO_SLOT && tpl_valid(e, slot, s)) {
        d = e->conns[slot].dest;
        if (*victim == (int64_t)slot)
            *victim = victim_but(e, now, slot);
    } else {
        d = call_schedule(e, s, saddr, sport, now);
        if (d < 0 || (unsigned long)d >= e->ndests || !(e->dests[d].flags & DEST_F_USED) ||
            e->dests[d].svc != (uint16_t)s)
            return d;
        slot = tpl_new(e, s, d, tproto, snet, daddr, tvport, whole ? e->dests[d].dport : 0, h,
                       *victim, now);
        if (slot == NO_SLOT)
            return d;
        *victim = victim_but(e, now, slot);
    }
    struct conn *t = &e->conns[slot];
    t->expires = now + t->tpl_timeout;
    *ct = slot;
    return d;
}

uint8_t conn_bind_xmit(const dest_row *dest)
{
    return dest->fwd == FWD_MASQ    ? XMIT_NAT
           : dest->fwd == FWD_ROUTE ? XMIT_DR
           : dest->fwd == FWD_TUNNEL && pylvs_tun_overhead(dest->tun_type) ? XMIT_TUN
                                                                           : XMIT_NONE;
}

/* A new conn's link to its template (ip_vs_control_add), or none. */
static void persist_bind(PylvsEngine *e, struct conn *c, uint32_t ct)
{
    c->flags = 0;
    c->control = 0;
    if (ct != NO_SLOT) {
        c->control = ct + 1;
        e->conns[ct].control++;
    }
}

/* --- the upcall limit (docs/engine.md, "Upcall limit") ------------------- */

void pylvs_engine_set_pressure(PylvsEngine *e, int on)
{
    e->pressure = on;
}

/* Receive pressure, a share below 100% and a known upcall cost: upcalls
 * are metered. */
static int upcall_limited(const PylvsEngine *e)
{
    return e->pressure && e->sysctl[SYS_UPCALL_SHARE] < 100 && e->upcall_cost > 0.0 &&
           e->schedule != NULL;
}

/* The bucket holds seconds of upcall time. It refills at the share of
 * `now`'s pace, up to UPCALL_WINDOW's worth; an upcall may start while any
 * is left and takes `upcall_cost` (control's measure of one upcall), so the
 * bucket may go below zero. Sans-IO: `now` and the cost are given. */
static int upcall_allowed(PylvsEngine *e, double now)
{
    struct rate_bucket *b = &e->upcall;
    double share = (double)e->sysctl[SYS_UPCALL_SHARE] / 100.0, cap = share * UPCALL_WINDOW;
    if (!b->primed) {
        b->tokens = cap;
        b->last = now;
        b->primed = 1;
    } else if (now > b->last) {
        double t = b->tokens + (now - b->last) * share;
        b->tokens = t < cap ? t : cap;
        b->last = now;
    }
    if (b->tokens <= 0.0)
        return 0;
    b->tokens -= e->upcall_cost;
    return 1;
}

static int rate_allow(struct rate_bucket *b, double now, int64_t per_sec, int64_t burst);

/* While the receive ring backs up, a new conn waits its turn: the worker
 * is behind, and every conn it makes costs a scheduling, a transmit and
 * the real server's answer through the director, time the established
 * flows' frames in the ring then lose (bench e2e, SYN flood: 0.4x of their
 * rate kept with AF_PACKET before this). pressure_conn_rate new conns a
 * second still pass, a burst of PRESSURE_WINDOW's worth (at least one),
 * so new clients are served in a flood; 0 turns the limit off. The IPVS kernel has
 * no such limit: its per-packet cost is in softirq, not behind a ring. */
static int pressure_admits(PylvsEngine *e, double now)
{
    int64_t rate = e->sysctl[SYS_PRESSURE_CONN_RATE];
    if (rate == 0)
        return 1;
    int64_t burst = (int64_t)((double)rate * PRESSURE_WINDOW);
    return rate_allow(&e->pressure_rl, now, rate, burst > 0 ? burst : 1);
}

/* A frame the miss path turns away: count it, give the verdict. */
static struct conn *refuse(PylvsEngine *e, int *verdict, int *why, int stat, int v)
{
    *why = stat;
    *verdict = finish(e, stat, v);
    return NULL;
}

/* A new conn of service `s` for the frame (step 9, from the scheduler on).
 * Returns it, or NULL with *verdict set and its counter (*why) counted.
 * Out of line: it is the rare path, and it calls Python. */
static __attribute__((noinline)) struct conn *
conn_new(PylvsEngine *e, int s, uint8_t proto, uint32_t saddr, uint16_t sport, uint32_t daddr,
         uint16_t dport, uint64_t h, const uint8_t *eth, uint16_t in_port, double now,
         int *verdict, int *why)
{
    /* At the limit, the conn to replace is chosen before the upcall, so a
     * full table refuses a flood without calling Python. */
    int64_t victim = -1;
    if (e->pressure && !pressure_admits(e, now))
        return refuse(e, verdict, why, ST_DROP_PRESSURE, PYLVS_V_DROP);
    if (conn_table_full(e) && (victim = conn_victim(e, now)) < 0)
        return refuse(e, verdict, why, ST_DROP_TABLE_FULL, PYLVS_V_DROP);
    uint32_t ct;
    long d = persist_dest(e, s, proto, saddr, sport, daddr, dport, now, &victim, &ct);
    if (d == SCHED_LIMITED)
        return refuse(e, verdict, why, ST_DROP_UPCALL_LIMIT, PYLVS_V_DROP);
    if (d == -2)
        return refuse(e, verdict, why, ST_SCHED_ERRORS, PYLVS_V_DROP);
    if (d < 0 || (unsigned long)d >= e->ndests)
        return refuse(e, verdict, why, ST_DROP_NO_DEST, PYLVS_V_DROP);
    const dest_row *dest = &e->dests[d];
    if (!(dest->flags & DEST_F_USED) || dest->svc != (uint16_t)s)
        return refuse(e, verdict, why, ST_DROP_NO_DEST, PYLVS_V_DROP);
    uint16_t rport = conn_dport(&e->services[s], dest, dport);

    /* ip_vs_bind_xmit: the transmitter is chosen here, once. */
    uint8_t xmit = conn_bind_xmit(dest);
    uint64_t hout = 0;
    if (xmit == XMIT_NAT) {
        hout = key_hash(e, proto, dest->daddr, rport, saddr, sport);
        struct bucket *ob = index_find(e, hout, proto, dest->daddr, rport, saddr, sport);
        if (ob != NULL) {
            uint32_t r = ob->ref - 1;
            if (e->conns[r >> 1].expires > now)
                return refuse(e, verdict, why, ST_DROP_CONFLICT, PYLVS_V_DROP);
            conn_remove(e, r >> 1, ST_CONNS_EXPIRED); /* a dead holder does not block the key */
        }
        /* IN key == OUT key: client, VIP and real server are one address:port */
        if (dest->daddr == saddr && rport == sport && saddr == daddr && sport == dport)
            return refuse(e, verdict, why, ST_DROP_CONFLICT, PYLVS_V_DROP);
    }
    uint32_t slot = conn_alloc(e, victim, now);
    if (slot == NO_SLOT) /* out of memory */
        return refuse(e, verdict, why, ST_DROP_TABLE_FULL, PYLVS_V_DROP);
    struct conn *c = &e->conns[slot];
    conn_fill(c, proto, saddr, sport, daddr, dport, dest, rport, s, d);
    c->state = S_NONE;
    c->in_port = in_port;
    c->expires = now + e->timeouts[S_NONE];
    memcpy(c->cmac, eth + 6, 6);
    memcpy(c->lmac, eth, 6);
    c->replied = 0;
    c->xmit = xmit;
    /* Replies of DR/Tun conns bypass the director: the kernel marks them
     * IP_VS_CONN_F_NOOUTPUT, and their client packets use INPUT_ONLY
     * (conn_in_dir). */
    c->in_pkts = 0;
    sync_conn_init(c, now);
    c->used = 1;
    persist_bind(e, c, ct);
    index_insert(e, h, slot, KEY_IN);
    if (xmit == XMIT_NAT)
        index_insert(e, hout, slot, KEY_OUT);
    e->conn_count++;
    e->stats[ST_CONNS_CREATED]++;
    dest_conns_add(e, (uint32_t)d, C_INACTIVE, 1);
    dest_overload_bind(e, (uint32_t)d);
    e->svc_stats[s][T_CONNS] += 1;
    e->dest_stats[d][T_CONNS] += 1;
    return c;
}

/* What frame_parse found in a frame. */
#define PARSE_TUPLE 0   /* a TCP or UDP segment, for the conn path */
#define PARSE_ICMP 1    /* an ICMP packet, for icmp_frame */
#define PARSE_REFUSED 2 /* finished at once with `stat` and `verdict` */

struct pkt {
    uint64_t hash; /* key_hash of the tuple (PARSE_TUPLE, batch path only) */
    uint32_t saddr, daddr;
    uint16_t sport, dport;
    uint16_t ihl, tot; /* valid from the IP total length check on */
    uint16_t stat;
    uint8_t verdict;
    uint8_t proto, tcpflags;
    uint8_t code;    /* PARSE_* */
    uint8_t options; /* an IPv4 header with options got past the length checks */
};

static inline int parse_refused(struct pkt *p, int stat, int verdict)
{
    p->stat = (uint16_t)stat;
    p->verdict = (uint8_t)verdict;
    return p->code = PARSE_REFUSED;
}

/* Steps 1-6 of docs/engine.md, "Per frame": the frame (vnet header first,
 * `len` bytes) is checked as far as its TCP or UDP header, and its tuple
 * read. Reads the frame only; the batch path runs it a stage ahead of the
 * rest of the frame's work. */
HOT int frame_parse(const uint8_t *frame, uint32_t len, struct pkt *p)
{
    p->options = 0;
    if (len < PYLVS_VNET_HDR_LEN + 14)
        return parse_refused(p, ST_DROP_TRUNCATED, PYLVS_V_DROP);
    const uint8_t *eth = frame + PYLVS_VNET_HDR_LEN;
    if (pylvs_rd16(eth + 12) != 0x0800)
        return parse_refused(p, ST_PASS_NOT_IPV4, PYLVS_V_PASS);
    const uint8_t *ip = eth + 14;
    uint32_t avail = len - (PYLVS_VNET_HDR_LEN + 14);
    if (avail < 20)
        return parse_refused(p, ST_DROP_TRUNCATED, PYLVS_V_DROP);
    uint32_t ihl = (uint32_t)(ip[0] & 0x0f) * 4;
    /* version 4 and IHL >= 5: 0x45..0x4f */
    if ((uint8_t)(ip[0] - 0x45) > 0x0a || ihl > avail)
        return parse_refused(p, ST_DROP_BAD_IP, PYLVS_V_DROP);
    uint32_t tot = pylvs_rd16(ip + 2);
    if (tot < ihl || tot > avail)
        return parse_refused(p, ST_DROP_BAD_IP, PYLVS_V_DROP);
    p->ihl = (uint16_t)ihl;
    p->tot = (uint16_t)tot;
    p->options = ihl > 20;
    if (pylvs_rd16(ip + 6) & 0x3fff) /* MF or a fragment offset */
        return parse_refused(p, ST_DROP_FRAGMENT, PYLVS_V_DROP);
    uint8_t proto = ip[9];
    p->proto = proto;
    if (proto == PROTO_ICMP)
        return p->code = PARSE_ICMP;
    if (proto != PROTO_TCP && proto != PROTO_UDP)
        return parse_refused(p, ST_PASS_NOT_OURS, PYLVS_V_PASS);

    const uint8_t *l4 = ip + ihl;
    uint32_t l4len = tot - ihl;
    p->tcpflags = 0;
    if (proto == PROTO_TCP) {
        if (l4len < 20)
            return parse_refused(p, ST_DROP_BAD_L4, PYLVS_V_DROP);
        uint32_t doff = (uint32_t)(l4[12] >> 4) * 4;
        if (doff < 20 || doff > l4len)
            return parse_refused(p, ST_DROP_BAD_L4, PYLVS_V_DROP);
        p->tcpflags = l4[13];
    } else {
        if (l4len < 8 || pylvs_rd16(l4 + 4) != l4len)
            return parse_refused(p, ST_DROP_BAD_L4, PYLVS_V_DROP);
    }
    p->saddr = pylvs_rd32(ip + 12);
    p->daddr = pylvs_rd32(ip + 16);
    p->sport = pylvs_rd16(l4);
    p->dport = pylvs_rd16(l4 + 2);
    return p->code = PARSE_TUPLE;
}

/* Start loading the conn that a parsed frame will find, assuming its
 * bucket is already on its way into the cache. */
HOT void prefetch_conn(const PylvsEngine *e, const struct pkt *p)
{
    if (p->code != PARSE_TUPLE)
        return;
    uint32_t tag = (uint32_t)p->hash;
    uint32_t i = tag & e->mask;
    for (int n = 0; n < 4; n++) {
        const struct bucket *b = &e->index[i];
        if (b->ref == 0)
            return;
        if (b->tag == tag) {
            __builtin_prefetch(&e->conns[(b->ref - 1) >> 1], 1);
            return;
        }
        i = (i + 1) & e->mask;
    }
}

/* --- what the engine makes and refuses (out of line: rare) ---------------- */

static int rate_allow(struct rate_bucket *b, double now, int64_t per_sec, int64_t burst)
{
    if (!b->primed) {
        b->tokens = (double)burst;
        b->last = now;
        b->primed = 1;
    } else if (now > b->last) {
        double t = b->tokens + (now - b->last) * (double)per_sec;
        b->tokens = t < (double)burst ? t : (double)burst;
        b->last = now;
    }
    if (b->tokens >= 1.0) {
        b->tokens -= 1.0;
        return 1;
    }
    return 0;
}

/* The kernel's per-destination ICMP limit (icmpv4_xrlim_allow,
 * inet_peer_xrlim_allow): one error per icmp_ratelimit ms to a host, a
 * burst of 6; a newcomer in a cache slot starts with a full burst. */
static int peer_allow(PylvsEngine *e, uint32_t daddr, double now)
{
    int64_t rl = e->sysctl[SYS_ICMP_RATELIMIT];
    struct icmp_peer *p = &e->peers[(uint32_t)(daddr * 0x9E3779B1u) >> 22];
    if (!p->used || p->addr != daddr) {
        p->used = 1;
        p->addr = daddr;
        p->tokens = 6.0 * (double)rl;
        p->last = now;
    } else if (now > p->last) {
        double t = p->tokens + (now - p->last) * 1000.0;
        p->tokens = t < 6.0 * (double)rl ? t : 6.0 * (double)rl;
        p->last = now;
    }
    if (p->tokens >= (double)rl) {
        p->tokens -= (double)rl;
        return 1;
    }
    return 0;
}

static int emit_room(const struct pylvs_emit *em, uint32_t need)
{
    return em != NULL && em->n < em->max && em->used <= em->cap && em->cap - em->used >= need;
}

/* A RST for a segment that matches no conn (docs/engine.md step 9). */
static __attribute__((noinline)) void
send_rst(PylvsEngine *e, struct pylvs_emit *em, const uint8_t *eth, const uint8_t *ip,
         uint32_t ihl, uint32_t tot, uint16_t in_port, double now)
{
    if (!rate_allow(&e->rst_rl, now, e->sysctl[SYS_TCP_RST_PER_SEC],
                    e->sysctl[SYS_TCP_RST_BURST])) {
        e->stats[ST_RST_RATELIMITED]++;
        return;
    }
    if (!emit_room(em, PYLVS_VNET_HDR_LEN + 14 + 40)) {
        e->stats[ST_EMIT_OVERFLOW]++;
        return;
    }
    if (pylvs_tcp_reset(em, in_port, eth, ip, ip + ihl, tot - ihl)) {
        e->stats[ST_EMIT_FRAMES]++;
        e->stats[ST_RST_SENT]++;
    }
}

/* An ICMP error (type, code) about the frame's packet, back out of its port
 * from `saddr`; frag-needed is never rate-limited (icmpv4_mask_allow). */
static __attribute__((noinline)) void
send_icmp(PylvsEngine *e, struct pylvs_emit *em, const uint8_t *eth, const uint8_t *ip,
          uint32_t tot, uint16_t in_port, double now, uint8_t type, uint8_t code, uint32_t info,
          uint32_t saddr)
{
    int frag_needed = type == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED;
    if (!frag_needed &&
        !(rate_allow(&e->icmp_rl, now, e->sysctl[SYS_ICMP_MSGS_PER_SEC],
                     e->sysctl[SYS_ICMP_MSGS_BURST]) &&
          peer_allow(e, pylvs_rd32(ip + 12), now))) {
        e->stats[ST_ICMP_RATELIMITED]++;
        return;
    }
    uint32_t quote = tot < PYLVS_ICMP_ERR_MAX - 28 ? tot : PYLVS_ICMP_ERR_MAX - 28;
    if (!emit_room(em, PYLVS_VNET_HDR_LEN + 14 + 28 + quote)) {
        e->stats[ST_EMIT_OVERFLOW]++;
        return;
    }
    if (pylvs_icmp_error(em, in_port, eth, ip, tot, type, code, info, saddr, e->ip_id)) {
        e->ip_id++;
        e->stats[ST_EMIT_FRAMES]++;
        e->stats[type == ICMP_TIME_EXCEEDED ? ST_ICMP_TIME_EXCEEDED_SENT
                 : frag_needed              ? ST_ICMP_FRAG_NEEDED_SENT
                                            : ST_ICMP_UNREACH_SENT]++;
    }
}

/* A frame to forward with TTL <= 1 (kernel ip_forward, IPVS decrement_ttl):
 * drop_ttl, answered with ICMP time exceeded from `saddr` unless `answer`
 * is 0 (an ICMP error is never answered with one). */
static __attribute__((noinline)) int
ttl_exceeded(PylvsEngine *e, struct pylvs_emit *em, const uint8_t *eth, const uint8_t *ip,
             uint32_t tot, uint16_t in_port, double now, uint32_t saddr, int answer)
{
    if (answer)
        send_icmp(e, em, eth, ip, tot, in_port, now, ICMP_TIME_EXCEEDED, ICMP_EXC_TTL, 0, saddr);
    return ST_DROP_TTL;
}

/* DEST_F_NO_ROUTE concerns the DR transmitter only (a directly connected
 * network is what DR needs): a conn bound to another method keeps going
 * when `-e` turns its dest into an unreachable DR dest, as the kernel's
 * conn keeps the xmit it was bound to. */
static inline uint8_t no_route_flag(uint8_t xmit)
{
    return xmit == XMIT_DR ? DEST_F_NO_ROUTE : 0;
}

/* Why a client-side frame of a conn cannot leave toward its dest, in the
 * kernel's order (the route, the TTL, the neighbour); called only when one
 * of them fails. */
static __attribute__((noinline)) int
xmit_refusal(PylvsEngine *e, struct pylvs_emit *em, const dest_row *dest, uint8_t xmit,
             const uint8_t *eth, const uint8_t *ip, uint32_t tot, uint16_t in_port, double now,
             uint32_t saddr, int answer)
{
    if (dest->flags & no_route_flag(xmit))
        return ST_DROP_NO_ROUTE;
    if (ip[8] <= 1)
        return ttl_exceeded(e, em, eth, ip, tot, in_port, now, saddr, answer);
    return ST_DROP_UNRESOLVED;
}

/* The fast test before xmit_refusal. */
HOT int xmit_ok(const dest_row *dest, uint8_t xmit, const uint8_t *ip)
{
    uint8_t mask = DEST_F_RESOLVED | no_route_flag(xmit);
    return (dest->flags & mask) == DEST_F_RESOLVED && ip[8] > 1;
}

/* The source of an ICMP error about a reply (step 11): the in port's
 * address, or the VIP when it has none. */
static uint32_t reply_icmp_saddr(const PylvsEngine *e, const struct conn *c, uint16_t in_port)
{
    const port_row *inp = pylvs_port(&e->net, in_port);
    return inp != NULL && inp->addr ? inp->addr : c->vaddr;
}

/* A frame step 7 refuses: dropped with the refusal's counter if it is ours
 * (its tuple is indexed, live or not, or a service matches), else passed. */
static __attribute__((noinline)) int
refuse_frame(PylvsEngine *e, int stat, uint8_t proto, uint32_t saddr, uint16_t sport,
             uint32_t daddr, uint16_t dport)
{
    uint64_t h = key_hash(e, proto, saddr, sport, daddr, dport);
    if (index_find(e, h, proto, saddr, sport, daddr, dport) != NULL ||
        find_service(e, proto, daddr, dport) >= 0)
        return finish(e, stat, PYLVS_V_DROP);
    return finish(e, ST_PASS_NOT_OURS, PYLVS_V_PASS);
}

#define MTU_FITS (-1)
#define MTU_FRAGMENT (-2)

/* The MTU a packet may have to leave on `egress` once `overhead` bytes of
 * tunnel headers are added (0: the port has no MTU, no check); never below
 * RFC 791's 68. */
static inline uint32_t egress_mtu(const PylvsEngine *e, uint16_t egress, uint32_t overhead,
                                  uint32_t learned)
{
    const port_row *p = pylvs_port(&e->net, egress);
    uint32_t mtu = p != NULL ? p->mtu : 0;
    if (learned != 0 && (mtu == 0 || learned < mtu))
        mtu = learned;
    if (mtu == 0)
        return 0;
    return mtu > overhead + 68 ? mtu - overhead : 68;
}

/* --- the tunnel path MTU (docs/engine.md, "Tunnel path MTU") ------------ */

static inline struct tun_pmtu *pmtu_slot(PylvsEngine *e, uint32_t daddr)
{
    return &e->pmtu[(uint32_t)(daddr * 0x9E3779B1u) >> 24];
}

/* The path MTU learned towards daddr and not yet expired, or 0. */
HOT uint32_t pmtu_get(PylvsEngine *e, uint32_t daddr, double now)
{
    const struct tun_pmtu *p = pmtu_slot(e, daddr);
    return p->mtu != 0 && p->daddr == daddr && p->expires > now ? p->mtu : 0;
}

/* A router reported `reported` as the next-hop MTU for the outer packets
 * to daddr, which leave on `egress`: the kernel's __ip_rt_update_pmtu. A
 * value above the path's current MTU is no news; one below min_pmtu is
 * taken as min_pmtu (never above the current one); either way the entry
 * lives mtu_expires seconds from now. Returns the path MTU now in force. */
static uint32_t pmtu_learn(PylvsEngine *e, uint32_t daddr, uint16_t egress, uint32_t reported,
                           double now)
{
    uint32_t cur = egress_mtu(e, egress, 0, pmtu_get(e, daddr, now));
    if (cur == 0)
        cur = 0xffff; /* no port MTU known: the IPv4 maximum */
    if (reported > cur)
        return cur;
    uint32_t mtu = reported;
    if (mtu < TUN_PMTU_MIN)
        mtu = cur < TUN_PMTU_MIN ? cur : TUN_PMTU_MIN;
    *pmtu_slot(e, daddr) = (struct tun_pmtu){.daddr = daddr, .mtu = mtu,
                                             .expires = now + TUN_PMTU_EXPIRES};
    return mtu;
}

/* Step 13 beyond the fast test: MTU_FITS, MTU_FRAGMENT, or the verdict
 * counter of a refusal (answered with frag-needed when DF is set). */
static __attribute__((noinline)) int
mtu_slow(PylvsEngine *e, struct pylvs_emit *em, const uint8_t *frame, const uint8_t *eth,
         const uint8_t *ip, uint32_t ihl, uint32_t tot, uint8_t proto, uint32_t mtu,
         uint16_t in_port, uint32_t icmp_saddr, double now)
{
    int gso = (frame[0] & VNET_F_NEEDS_CSUM) && frame[1] != 0;
    uint32_t need = tot;
    if (gso) {
        uint32_t gso_size = (uint32_t)frame[4] | (uint32_t)frame[5] << 8;
        const uint8_t *l4 = ip + ihl;
        uint32_t hdr = ihl + (proto == PROTO_TCP ? (uint32_t)(l4[12] >> 4) * 4 : 8);
        if (gso_size)
            need = hdr + gso_size;
    }
    if (need <= mtu)
        return MTU_FITS;
    uint8_t gso_kind = frame[1] & 0x7f;
    if ((pylvs_rd16(ip + 6) & IP_DF) ||
        (gso && (gso_kind == VNET_GSO_TCPV4 || gso_kind == VNET_GSO_TCPV6))) {
        send_icmp(e, em, eth, ip, tot, in_port, now, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu,
                  icmp_saddr);
        return ST_DROP_FRAG_NEEDED;
    }
    if (gso)
        return ST_DROP_GSO_TOO_BIG;
    return MTU_FRAGMENT;
}

/* Step 13's fast test: the frame fits `mtu` (egress_mtu; 0: no check) as
 * it is, no GSO segment size to look at. */
HOT int mtu_fits(const uint8_t *frame, uint32_t tot, uint32_t mtu)
{
    return mtu == 0 || (tot <= mtu && !((frame[0] & VNET_F_NEEDS_CSUM) && frame[1] != 0));
}

/* Step 13: does the frame fit `mtu` (egress_mtu; 0: no check)? */
HOT int mtu_check(PylvsEngine *e, struct pylvs_emit *em, const uint8_t *frame,
                  const uint8_t *eth, const uint8_t *ip, uint32_t ihl, uint32_t tot,
                  uint8_t proto, uint32_t mtu, uint16_t in_port, uint32_t icmp_saddr,
                  double now)
{
    if (mtu_fits(frame, tot, mtu))
        return MTU_FITS;
    return mtu_slow(e, em, frame, eth, ip, ihl, tot, proto, mtu, in_port, icmp_saddr, now);
}

/* A rewritten frame with DF clear that is too big: its IP fragments leave
 * through the emit area instead (V_EMIT). */
static __attribute__((noinline)) int
fragment_out(PylvsEngine *e, struct pylvs_emit *em, const uint8_t *eth, const uint8_t *ip,
             uint32_t tot, uint16_t egress)
{
    uint32_t k = pylvs_ip_fragment(em, egress, eth, ip, tot, e->net.ports[egress].mtu);
    if (k == 0)
        return finish(e, ST_EMIT_OVERFLOW, PYLVS_V_DROP);
    e->stats[ST_EMIT_FRAMES] += k;
    e->stats[ST_FRAG_OUT] += k;
    return finish(e, ST_TX_FRAGMENTED, PYLVS_V_EMIT);
}

/* A packet with DF clear too big for the tunnel: its IP fragments (each
 * fitting `mtu`, the path's MTU less the tunnel's headers), each encapsulated. All or
 * nothing: the count of frames emitted, or 0. */
#define TUN_FRAG_MAX 64
static uint32_t tun_fragments(PylvsEngine *e, struct pylvs_emit *em, uint16_t egress,
                              const uint8_t *eth_out, const uint8_t *ip, uint32_t tot,
                              const struct pylvs_tun *t, uint32_t mtu)
{
    uint32_t overhead = pylvs_tun_overhead(t->type);
    if (e->scratch == NULL && (e->scratch = PyMem_RawMalloc(SCRATCH_BYTES)) == NULL)
        return 0;
    uint32_t off[TUN_FRAG_MAX], len[TUN_FRAG_MAX];
    uint16_t port[TUN_FRAG_MAX];
    struct pylvs_emit frags = {.buf = e->scratch, .cap = SCRATCH_BYTES, .max = TUN_FRAG_MAX,
                               .off = off, .len = len, .port = port};
    uint32_t k = pylvs_ip_fragment(&frags, egress, eth_out, ip, tot, mtu);
    uint32_t need = 0;
    for (uint32_t i = 0; i < k; i++)
        need += len[i] + overhead;
    if (k == 0 || em == NULL || em->n + k > em->max || em->cap - em->used < need)
        return 0;
    uint32_t hdr = PYLVS_VNET_HDR_LEN + 14;
    for (uint32_t i = 0; i < k; i++)
        pylvs_tun_encap(em, egress, eth_out, frags.buf + off[i] + hdr, len[i] - hdr, t,
                        (uint16_t)(e->ip_id + i));
    e->stats[ST_FRAG_OUT] += k;
    return k;
}

/* The GUE source port of a conn: spread over the kernel's default local
 * port range 32768-60999 by a hash of the client side, as udp_flow_src_port
 * spreads flows (a plain multiplicative hash, the same in the reference). */
static inline uint16_t gue_sport(const struct conn *c)
{
    uint32_t h = c->caddr * 0x9E3779B1u ^ (uint32_t)c->cport * 0x85EBCA6Bu;
    return (uint16_t)(32768u + h % 28232u);
}

/* The size of the largest outer packet a frame makes in the tunnel `t`:
 * for a GSO frame one segment (headers + gso_size), else the packet. */
static uint32_t tun_outer_size(const uint8_t *frame, const uint8_t *ip, uint32_t ihl,
                               uint32_t tot, uint8_t proto, const struct pylvs_tun *t)
{
    uint32_t size = tot;
    if ((frame[0] & VNET_F_NEEDS_CSUM) && frame[1] != 0) {
        uint32_t gso_size = (uint32_t)frame[4] | (uint32_t)frame[5] << 8;
        const uint8_t *l4 = ip + ihl;
        uint32_t hdr = ihl + (proto == PROTO_TCP ? (uint32_t)(l4[12] >> 4) * 4 : 8);
        if (gso_size && hdr + gso_size < tot)
            size = hdr + gso_size;
    }
    return size + pylvs_tun_overhead(t->type);
}

/* pmtu_disc 0 (the kernel's ip_vs_tunnel_xmit with df 0): the packet, or
 * each GSO segment, is encapsulated whole with the outer DF clear, and an
 * outer packet bigger than `outer_mtu` (the path's) is cut into IP
 * fragments of the outer packet, as the kernel's ip_fragment after the
 * tunnel: the real server reassembles the outer packet. All or nothing:
 * the frames emitted, or 0; *ids gets the outer packets made (each takes
 * an IP ID, its fragments share it). */
static uint32_t tun_outer(PylvsEngine *e, struct pylvs_emit *em, uint16_t egress,
                          const uint8_t *eth_out, uint8_t *frame, uint8_t *ip, uint32_t ihl,
                          uint32_t tot, uint8_t proto, const struct pylvs_tun *t,
                          uint32_t outer_mtu, uint32_t *ids)
{
    if (em == NULL ||
        (e->scratch == NULL && (e->scratch = PyMem_RawMalloc(SCRATCH_BYTES)) == NULL))
        return 0;
    uint32_t off[TUN_FRAG_MAX], len[TUN_FRAG_MAX];
    uint16_t port[TUN_FRAG_MAX];
    struct pylvs_emit outer = {.buf = e->scratch, .cap = SCRATCH_BYTES, .max = TUN_FRAG_MAX,
                               .off = off, .len = len, .port = port};
    uint32_t k;
    if ((frame[0] & VNET_F_NEEDS_CSUM) && frame[1] != 0) {
        k = pylvs_gso_segments(&outer, egress, eth_out, frame, ip, tot, t, e->ip_id);
    } else {
        if (frame[0] & VNET_F_NEEDS_CSUM)
            csum_complete(e, frame, ip, ip + ihl, tot - ihl, proto);
        k = pylvs_tun_encap(&outer, egress, eth_out, ip, tot, t, e->ip_id) ? 1 : 0;
    }
    uint32_t saved_n = em->n, saved_used = em->used, frags = 0;
    const uint32_t hdr = PYLVS_VNET_HDR_LEN + 14;
    for (uint32_t i = 0; i < k; i++) {
        const uint8_t *f = outer.buf + off[i];
        uint32_t olen = len[i] - hdr;
        if (olen <= outer_mtu) {
            uint8_t *d = pylvs_emit_reserve(em, len[i], egress);
            if (d == NULL)
                goto undo;
            memcpy(d, f, len[i]);
            continue;
        }
        uint32_t m = pylvs_ip_fragment(em, egress, eth_out, f + hdr, olen, outer_mtu);
        if (m == 0)
            goto undo;
        frags += m;
    }
    if (k == 0)
        return 0;
    e->stats[ST_FRAG_OUT] += frags;
    *ids = k;
    return em->n - saved_n;
undo:
    em->n = saved_n;
    em->used = saved_used;
    return 0;
}

/* VS-Tun (the kernel's ip_vs_tunnel_xmit): the packet (TTL already
 * decremented) leaves encapsulated, IPIP or GUE, from the egress port's
 * address to the RIP; a GSO frame is cut into segments first (no virtio GSO
 * type describes IPIP), a partial checksum completed, a too-big packet with
 * DF clear cut into IP fragments that are encapsulated one by one (so the
 * real server reassembles the inner packet, not the tunnel's) when
 * frag_mtu (the fragments' MTU) is not 0; with outer_mtu not 0 (pmtu_disc
 * 0), the outer packets are cut to it instead (tun_outer). Everything goes
 * to the emit area: V_EMIT, tx_tunneled. */
static __attribute__((noinline)) int
tun_xmit(PylvsEngine *e, struct pylvs_emit *em, const struct conn *c, const dest_row *dest,
         uint8_t *frame, uint8_t *ip, uint32_t ihl, uint32_t tot, uint8_t proto,
         uint32_t frag_mtu, uint32_t outer_mtu)
{
    uint8_t eth_out[14];
    memcpy(eth_out, dest->dmac, 6);
    memcpy(eth_out + 6, dest->smac, 6);
    eth_out[12] = 0x08;
    eth_out[13] = 0x00;
    const port_row *p = pylvs_port(&e->net, dest->out_port);
    struct pylvs_tun t = {
        .type = dest->tun_type,
        .csum = dest->tun_flags == TUN_F_CSUM,
        .sport = gue_sport(c),
        .dport = dest->tun_port,
        .saddr = p != NULL && p->addr ? p->addr : c->vaddr,
        .daddr = c->daddr,
        .nodf = e->sysctl[SYS_PMTU_DISC] == 0,
    };
    uint32_t n, ids = 0;
    if (outer_mtu != 0 && tun_outer_size(frame, ip, ihl, tot, proto, &t) > outer_mtu) {
        n = tun_outer(e, em, dest->out_port, eth_out, frame, ip, ihl, tot, proto, &t, outer_mtu,
                      &ids);
    } else if ((frame[0] & VNET_F_NEEDS_CSUM) && frame[1] != 0) {
        n = pylvs_gso_segments(em, dest->out_port, eth_out, frame, ip, tot, &t, e->ip_id);
    } else {
        if (frame[0] & VNET_F_NEEDS_CSUM)
            csum_complete(e, frame, ip, ip + ihl, tot - ihl, proto);
        n = frag_mtu ? tun_fragments(e, em, dest->out_port, eth_out, ip, tot, &t, frag_mtu)
                     : (pylvs_tun_encap(em, dest->out_port, eth_out, ip, tot, &t, e->ip_id) ? 1 : 0);
    }
    if (n == 0)
        return finish(e, ST_EMIT_OVERFLOW, PYLVS_V_DROP);
    e->ip_id = (uint16_t)(e->ip_id + (ids ? ids : n));
    e->stats[ST_EMIT_FRAMES] += n;
    return finish(e, ST_TX_TUNNELED, PYLVS_V_EMIT);
}

/* One of the director's own addresses: a port's, or one of `local`. */
static int own_addr(const PylvsEngine *e, uint32_t addr)
{
    for (uint32_t i = 0; i < e->net.nports; i++)
        if ((e->net.ports[i].flags & PORT_F_USED) && e->net.ports[i].addr == addr)
            return 1;
    return pylvs_is_local(&e->net, addr);
}

/* An ICMP error about a packet the director sent through a tunnel, as
 * tun_icmp_quote finds it: offsets from the outer IP header. */
struct tun_quote {
    uint32_t outer;    /* the quoted outer IPv4 header */
    uint32_t outer_hl; /* its IHL * 4 (0: malformed, or a non-first fragment) */
    uint32_t inner;    /* the inner IPv4 header after the tunnel's (0: cut off) */
    uint8_t type;      /* PYLVS_TUN_IPIP or PYLVS_TUN_GUE */
};

/* Is this ICMP error (type 3, 4 or 11) about one of the director's tunnel
 * packets: sent to an address of the director's and quoting an outer
 * header from that same address that carries IPIP, or UDP whose payload
 * starts with the GUE header pylvs writes (00 04 00 00)? 1 and *q filled,
 * or 0: the ordinary ICMP path decides. (The kernel's ip_vs_in_icmp asks
 * for a local destination and a Tun dest at the quoted daddr; the conn
 * check in tun_icmp covers the second.) */
static int tun_icmp_quote(const PylvsEngine *e, const uint8_t *ip, uint32_t ihl, uint32_t tot,
                          struct tun_quote *q)
{
    uint32_t o = ihl + 8;
    if (tot < o + 20)
        return 0;
    uint8_t type = ip[ihl];
    if (type != ICMP_DEST_UNREACH && type != ICMP_SOURCE_QUENCH && type != ICMP_TIME_EXCEEDED)
        return 0;
    const uint8_t *oh = ip + o;
    uint32_t daddr = pylvs_rd32(ip + 16);
    if ((oh[0] >> 4) != 4 || pylvs_rd32(oh + 12) != daddr)
        return 0;
    uint32_t hl = (uint32_t)(oh[0] & 15) * 4;
    int whole = hl >= 20 && o + hl <= tot && !(pylvs_rd16(oh + 6) & IP_OFFSET_MASK);
    uint32_t in = o + hl;
    if (oh[9] == PYLVS_IPPROTO_IPIP) {
        q->type = PYLVS_TUN_IPIP;
    } else if (oh[9] == PROTO_UDP && whole && in + 12 <= tot && pylvs_rd32(oh + hl + 8) == 0x00040000) {
        q->type = PYLVS_TUN_GUE;
        in += 12;
    } else {
        return 0;
    }
    if (!own_addr(e, daddr))
        return 0;
    q->outer = o;
    q->outer_hl = whole ? hl : 0;
    q->inner = whole && in + 20 <= tot ? in : 0;
    return 1;
}

/* The kernel's ip_vs_in_icmp for its tunnels: a router on the path to a
 * Tun real server reports about an outer packet. Frag-needed is learned
 * as the path MTU to the RIP (pmtu_learn), and a client whose packet had
 * DF is told the MTU less the tunnel's headers, in a frag-needed from the
 * VIP quoting the inner packet as far as the router quoted it (the
 * packet as the director forwarded it: one hop older); V_PASS,
 * tun_pmtu_learned, for the director's kernel updates its own route from
 * its copy. Other errors (type 3, 4, 11) are relayed to the client as they
 * came, about the inner packet: V_PASS, tun_icmp_relayed. Malformed quotes
 * and quotes of no Tun conn to that RIP: V_DROP, drop_tun_icmp (the kernel's copy still stands: the
 * steering table never drops ICMP to the director's own addresses). */
static __attribute__((noinline)) int
tun_icmp(PylvsEngine *e, struct pylvs_emit *em, const uint8_t *eth, const uint8_t *ip,
         uint32_t ihl, uint32_t tot, uint16_t in_port, double now, const struct tun_quote *q)
{
    int refusal = pylvs_refusal(&e->net, eth, ip, ihl, in_port);
    if (refusal < 0)
        refusal = pylvs_martian(&e->net, pylvs_rd32(ip + 12), in_port);
    if (refusal >= 0)
        return finish(e, refusal, PYLVS_V_DROP);
    if (q->inner == 0 || pylvs_fold(pylvs_csum_bytes(ip + ihl, tot - ihl)) != 0xffff)
        return finish(e, ST_DROP_TUN_ICMP, PYLVS_V_DROP);
    const uint8_t *oh = ip + q->outer, *in = ip + q->inner;
    uint32_t avail = tot - q->inner, hl = (uint32_t)(in[0] & 15) * 4;
    uint8_t proto = in[9];
    if ((in[0] >> 4) != 4 || hl < 20 || hl + 8 > avail || (pylvs_rd16(in + 6) & IP_OFFSET_MASK) ||
        (proto != PROTO_TCP && proto != PROTO_UDP))
        return finish(e, ST_DROP_TUN_ICMP, PYLVS_V_DROP);
    if (pylvs_rd16(in + 2) < avail) /* no bytes beyond the inner packet in the answer */
        avail = pylvs_rd16(in + 2) > hl + 8 ? pylvs_rd16(in + 2) : hl + 8;
    /* The quoted packet went client -> VIP: the conn's IN key as it is. */
    uint32_t caddr = pylvs_rd32(in + 12), vaddr = pylvs_rd32(in + 16);
    uint16_t cport = pylvs_rd16(in + hl), vport = pylvs_rd16(in + hl + 2);
    uint64_t h = key_hash(e, proto, caddr, cport, vaddr, vport);
    struct bucket *b = index_find(e, h, proto, caddr, cport, vaddr, vport);
    if (b == NULL)
        return finish(e, ST_DROP_TUN_ICMP, PYLVS_V_DROP);
    uint32_t r = b->ref - 1;
    struct conn *c = &e->conns[r >> 1];
    if (c->expires <= now) {
        conn_remove(e, r >> 1, ST_CONNS_EXPIRED);
        return finish(e, ST_DROP_TUN_ICMP, PYLVS_V_DROP);
    }
    const dest_row *dest = conn_dest(e, c);
    if ((r & 1) != KEY_IN || c->xmit != XMIT_TUN || dest == NULL ||
        c->daddr != pylvs_rd32(oh + 16) || dest->tun_type != q->type ||
        (q->type == PYLVS_TUN_GUE && pylvs_rd16(oh + q->outer_hl + 2) != dest->tun_port))
        return finish(e, ST_DROP_TUN_ICMP, PYLVS_V_DROP);
    if (c->flags & CONN_F_NO_L2) /* synced, its client not heard: its route, if it knows */
        sync_route_l2(e, c);
    uint8_t eth_c[14]; /* as if the inner packet had come in from the client */
    memcpy(eth_c, c->lmac, 6);
    memcpy(eth_c + 6, c->cmac, 6);
    eth_c[12] = 0x08;
    eth_c[13] = 0x00;
    if (ip[ihl] != ICMP_DEST_UNREACH || ip[ihl + 1] != ICMP_FRAG_NEEDED) {
        /* ip_vs_in_icmp relays the other errors as they are (type, code
         * and the word after them), about the inner packet. */
        send_icmp(e, em, eth_c, in, avail, c->in_port, now, ip[ihl], ip[ihl + 1],
                  pylvs_rd32(ip + ihl + 4), c->vaddr);
        return finish(e, ST_TUN_ICMP_RELAYED, PYLVS_V_PASS);
    }
    uint32_t mtu = pmtu_learn(e, c->daddr, dest->out_port, pylvs_rd16(ip + ihl + 6), now);
    if (pylvs_rd16(in + 6) & IP_DF) {
        /* ip_vs_in_icmp: the route's MTU less the tunnel's headers. */
        uint32_t ovh = pylvs_tun_overhead(q->type);
        send_icmp(e, em, eth_c, in, avail, c->in_port, now, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED,
                  mtu > 68 + ovh ? mtu - ovh : mtu, c->vaddr);
    }
    return finish(e, ST_TUN_PMTU_LEARNED, PYLVS_V_PASS);
}

/* The ICMP path (docs/engine.md): an ICMP error about a conn goes where the
 * conn's packets go (ip_vs_in_icmp / ip_vs_out_icmp): translated for NAT,
 * as it is for DR (ip_vs_icmp_xmit hands it to the conn's transmitter).
 * Like any forwarded packet its TTL drops by one; it is never answered. */
static __attribute__((noinline)) int
icmp_frame(PylvsEngine *e, struct pylvs_emit *em, uint8_t *frame, uint8_t *eth, uint8_t *ip,
           uint32_t ihl, uint32_t tot, uint16_t in_port, double now, uint16_t *out_port)
{
    struct tun_quote q;
    if (tun_icmp_quote(e, ip, ihl, tot, &q))
        return tun_icmp(e, em, eth, ip, ihl, tot, in_port, now, &q);
    struct pylvs_icmp_inner in;
    if (!pylvs_icmp_inner(ip, tot, &in))
        return finish(e, ST_PASS_NOT_OURS, PYLVS_V_PASS);
    /* The quoted packet went the other way: its reverse is the conn's key. */
    uint64_t h = key_hash(e, in.proto, in.daddr, in.dport, in.saddr, in.sport);
    struct bucket *b = index_find(e, h, in.proto, in.daddr, in.dport, in.saddr, in.sport);
    if (b == NULL)
        return finish(e, ST_PASS_NOT_OURS, PYLVS_V_PASS);
    uint32_t r = b->ref - 1;
    struct conn *c = &e->conns[r >> 1];
    if (c->expires <= now) {
        conn_remove(e, r >> 1, ST_CONNS_EXPIRED);
        return finish(e, ST_PASS_NOT_OURS, PYLVS_V_PASS);
    }
    if (c->xmit == XMIT_NONE)
        return finish(e, ST_PASS_NOT_OURS, PYLVS_V_PASS);
    int refusal = pylvs_refusal(&e->net, eth, ip, ihl, in_port);
    if (refusal < 0) /* the kernel's route input refuses the error's own source first */
        refusal = pylvs_martian(&e->net, pylvs_rd32(ip + 12), in_port);
    if (refusal >= 0)
        return finish(e, refusal, PYLVS_V_DROP);
    if ((r & 1) == KEY_IN) {
        /* From the client side, about a reply it got: to the real server. */
        const dest_row *dest = conn_dest(e, c);
        if (dest == NULL)
            return finish(e, ST_DROP_DEST_GONE, PYLVS_V_DROP);
        if (!xmit_ok(dest, c->xmit, ip))
            return finish(e, xmit_refusal(e, NULL, dest, c->xmit, eth, ip, tot, in_port, now,
                                          0, 0),
                          PYLVS_V_DROP);
        if (c->xmit == XMIT_NAT) {
            ip[8]--; /* pylvs_nat_icmp sums the outer header afresh */
            pylvs_nat_icmp(ip, tot, 0, c->daddr, c->dport);
        } else {
            ip_decrease_ttl(ip);
        }
        count_traffic(e, c, T_INPKTS, T_INBYTES, tot);
        if (c->xmit == XMIT_TUN) {
            /* Through the tunnel, as the conn's packets (ip_vs_icmp_xmit). */
            e->stats[ST_ICMP_FORWARDED]++;
            return tun_xmit(e, em, c, dest, frame, ip, ihl, tot, PROTO_ICMP, 0, 0);
        }
        memcpy(eth, dest->dmac, 6);
        memcpy(eth + 6, dest->smac, 6);
        *out_port = dest->out_port;
    } else {
        /* From the real server's side, about a packet from the client (NAT
         * only: no other conn has an OUT key). */
        if ((c->flags & CONN_F_NO_L2) && !sync_route_l2(e, c)) /* its client not heard yet */
            return finish(e, ST_DROP_SYNC_NO_MAC, PYLVS_V_DROP);
        if (ip[8] <= 1)
            return finish(e, ST_DROP_TTL, PYLVS_V_DROP);
        ip[8]--;
        pylvs_nat_icmp(ip, tot, 1, c->vaddr, c->vport);
        memcpy(eth, c->cmac, 6);
        memcpy(eth + 6, c->lmac, 6);
        *out_port = c->in_port;
        count_traffic(e, c, T_OUTPKTS, T_OUTBYTES, tot);
    }
    e->stats[ST_ICMP_FORWARDED]++;
    return finish(e, ST_TX_FRAMES, PYLVS_V_TX);
}

/* nat_icmp_send (the kernel's ip_vs_out, ip_vs_has_real_service): a packet
 * from a NAT real server (saddr:sport is a used FWD_MASQ dest of a service
 * of this protocol) that matches no conn is dropped and answered with ICMP
 * port unreachable from the in port's address, unless it is a TCP RST.
 * Returns the verdict, or -1 when the rule does not apply. The dest table
 * is scanned (the kernel hashes its real servers for this): only while the
 * sysctl is set, and only for frames that no conn and no service claim. */
static __attribute__((noinline)) int
rs_no_conn(PylvsEngine *e, struct pylvs_emit *em, const uint8_t *eth, const uint8_t *ip,
           uint32_t tot, uint8_t proto, uint8_t tcpflags, uint32_t saddr, uint16_t sport,
           uint16_t in_port, double now)
{
    if (proto == PROTO_TCP && (tcpflags & TH_RST))
        return -1;
    for (uint32_t d = 0; d < e->ndests; d++) {
        const dest_row *r = &e->dests[d];
        if (!(r->flags & DEST_F_USED) || r->fwd != FWD_MASQ || r->daddr != saddr ||
            r->dport != sport || r->svc >= e->nservices || e->services[r->svc].proto != proto)
            continue;
        const port_row *p = pylvs_port(&e->net, in_port);
        if (p != NULL && p->addr)
            send_icmp(e, em, eth, ip, tot, in_port, now, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0,
                      p->addr);
        return finish(e, ST_DROP_RS_NO_CONN, PYLVS_V_DROP);
    }
    return -1;
}

/* A frame no conn and no service claims: is it a VS-DR/Tun real server's
 * reply to a client on the director itself (docs/io.md, "Clients on the
 * director")? It comes from vaddr:vport to caddr:cport, the reverse of the
 * conn's IN key; the conn's client frames came in on the loopback port.
 * The kernel would drop it as a martian (its source, the VIP, is a local
 * address), so it goes, unchanged, out of that port, which hands it to the
 * local stack. Else the kernel's, as before. Out of line: the rare path. */
static __attribute__((noinline)) int
local_reply(PylvsEngine *e, uint8_t proto, uint32_t saddr, uint16_t sport, uint32_t daddr,
            uint16_t dport, uint32_t tot, uint16_t in_port, double now, uint16_t *out_port)
{
    const port_row *in = pylvs_port(&e->net, in_port);
    if (in == NULL || (in->flags & PORT_F_LOCAL))
        return finish(e, ST_PASS_NOT_OURS, PYLVS_V_PASS);
    uint64_t h = key_hash(e, proto, daddr, dport, saddr, sport);
    struct bucket *b = index_find(e, h, proto, daddr, dport, saddr, sport);
    if (b == NULL || ((b->ref - 1) & 1) != KEY_IN)
        return finish(e, ST_PASS_NOT_OURS, PYLVS_V_PASS);
    struct conn *c = &e->conns[(b->ref - 1) >> 1];
    const port_row *lp = pylvs_port(&e->net, c->in_port);
    if (c->expires <= now || (c->xmit != XMIT_DR && c->xmit != XMIT_TUN) || lp == NULL ||
        !(lp->flags & PORT_F_LOCAL))
        return finish(e, ST_PASS_NOT_OURS, PYLVS_V_PASS);
    count_traffic(e, c, T_OUTPKTS, T_OUTBYTES, tot);
    *out_port = c->in_port;
    return finish(e, ST_TX_FRAMES, PYLVS_V_TX);
}

/* One frame through the pipeline. `pre` is frame_parse's result for it with
 * the tuple's hash, made by the batch path ahead of time, or NULL. */
static inline __attribute__((always_inline)) int
engine_frame(PylvsEngine *e, uint8_t *frame, uint32_t len, uint16_t in_port, double now,
             uint16_t *out_port, const struct pkt *pre, struct pylvs_emit *em)
{
    e->stats[ST_RX_FRAMES]++;
    /* Only C callers get here during the scheduler upcall (process() refuses
     * re-entry): the miss path is half done, so a nested frame must not
     * touch the table. The scheduler that re-entered is at fault. */
    if (__builtin_expect(e->busy, 0))
        return finish(e, ST_SCHED_ERRORS, PYLVS_V_DROP);
    struct pkt own;
    const struct pkt *p = pre;
    if (p == NULL) {
        /* Zeroed: GCC cannot see that each code sets what it reads. */
        memset(&own, 0, sizeof own);
        frame_parse(frame, len, &own);
        p = &own;
    }
    if (__builtin_expect(p->options, 0))
        e->stats[ST_IP_OPTIONS]++;
    uint8_t *eth = frame + PYLVS_VNET_HDR_LEN;
    uint8_t *ip = eth + 14;
    if (__builtin_expect(p->code != PARSE_TUPLE, 0)) {
        if (p->code == PARSE_ICMP)
            return icmp_frame(e, em, frame, eth, ip, p->ihl, p->tot, in_port, now, out_port);
        return finish(e, p->stat, p->verdict);
    }

    uint32_t ihl = p->ihl, tot = p->tot;
    uint8_t *l4 = ip + ihl;
    uint32_t l4len = tot - ihl;
    uint8_t proto = p->proto, tcpflags = p->tcpflags;
    uint32_t saddr = p->saddr, daddr = p->daddr;
    uint16_t sport = p->sport, dport = p->dport;

    int refusal = pylvs_refusal(&e->net, eth, ip, ihl, in_port);
    if (__builtin_expect(refusal >= 0, 0))
        return refuse_frame(e, refusal, proto, saddr, sport, daddr, dport);

    struct conn *c = NULL;
    const dest_row *dest = NULL; /* an IN hit's, once checked */
    int dir = KEY_IN;
    uint64_t h = pre != NULL ? pre->hash : key_hash(e, proto, saddr, sport, daddr, dport);
    struct bucket *b = index_find(e, h, proto, saddr, sport, daddr, dport);
    if (b != NULL) {
        uint32_t r = b->ref - 1;
        c = &e->conns[r >> 1];
        dir = r & 1;
        if (c->expires <= now) {
            conn_remove(e, r >> 1, ST_CONNS_EXPIRED);
            c = NULL;
            dir = KEY_IN;
        } else if (dir == KEY_IN) {
            /* A SYN (is_new_conn) or a conn whose dest is gone: the
             * kernel's ip_vs_in looks at these twice. */
            dest = conn_dest(e, c);
            if (__builtin_expect(dest == NULL || is_new_conn(proto, tcpflags), 0)) {
                int rule = conn_in_rules(e, r >> 1, proto, tcpflags);
                if (rule == IN_DROPPED)
                    return PYLVS_V_DROP;
                if (rule == IN_RESCHED) {
                    c = NULL;
                    dest = NULL;
                }
            }
        }
    }

    if (c == NULL) {
        int s = find_service(e, proto, daddr, dport);
        if (s < 0) {
            if (__builtin_expect(e->sysctl[SYS_NAT_ICMP_SEND] != 0, 0)) {
                int v = rs_no_conn(e, em, eth, ip, tot, proto, tcpflags, saddr, sport, in_port,
                                   now);
                if (v >= 0)
                    return v;
            }
            return local_reply(e, proto, saddr, sport, daddr, dport, tot, in_port, now,
                               out_port);
        }
        int m = pylvs_martian(&e->net, saddr, in_port);
        if (m >= 0)
            return finish(e, m, PYLVS_V_DROP);
        if (proto == PROTO_TCP && !tcp_may_open(e, tcpflags)) {
            /* Only a SYN makes a conn; the rest get the kernel stack's RST. */
            if (!(tcpflags & TH_RST))
                send_rst(e, em, eth, ip, ihl, tot, in_port, now);
            return finish(e, ST_DROP_NO_CONN, PYLVS_V_DROP);
        }
        if (__builtin_expect(e->drop_rate != 0, 0) && defense_todrop(e))
            return finish(e, ST_DROP_DEFENSE, PYLVS_V_DROP);
        int verdict, why;
        c = conn_new(e, s, proto, saddr, sport, daddr, dport, h, eth, in_port, now, &verdict,
                     &why);
        if (c == NULL) {
            if (why == ST_DROP_NO_DEST) /* ip_vs_leave: refused at once */
                send_icmp(e, em, eth, ip, tot, in_port, now, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH,
                          0, daddr);
            return verdict;
        }
        if ((e->services[s].flags & SVC_F_ONE_PACKET) && proto == PROTO_UDP)
            e->ops_slot = (uint32_t)(c - e->conns);
        dir = KEY_IN;
    }

    if (dir == KEY_IN) {
        if (dest == NULL) /* a new conn's (IN_KEEP leaves only conns with one) */
            dest = conn_dest(e, c);
        if (dest == NULL)
            return finish(e, ST_DROP_DEST_GONE, PYLVS_V_DROP);
        if (__builtin_expect(c->xmit == XMIT_NONE, 0))
            return finish(e, ST_DROP_FWD_METHOD, PYLVS_V_DROP);
        if (__builtin_expect(c->flags & CONN_F_NO_L2, 0))
            sync_learn_l2(c, eth, in_port);
        conn_set_state(e, c, conn_in_dir(c), tcpflags, now);
        count_traffic(e, c, T_INPKTS, T_INBYTES, tot);
        if (__builtin_expect(e->sync_q != NULL, 0)) /* ip_vs_in_hook: after the state */
            sync_conn(e, c, e->ops_slot == (uint32_t)(c - e->conns), now);
        if (__builtin_expect(!xmit_ok(dest, c->xmit, ip), 0))
            return finish(e, xmit_refusal(e, em, dest, c->xmit, eth, ip, tot, in_port, now,
                                          daddr, 1),
                          PYLVS_V_DROP);
        /* The common case, NAT to a path the frame fits: the TTL, the
         * addresses and the checksums in one pass. */
        if (__builtin_expect(c->xmit == XMIT_NAT, 1) &&
            __builtin_expect(mtu_fits(frame, tot, egress_mtu(e, dest->out_port, 0, 0)), 1)) {
            *out_port = nat_xmit_in(e, c, dest, frame, eth, ip, l4, l4len, proto, daddr, dport, 1);
            return finish(e, ST_TX_FRAMES, PYLVS_V_TX);
        }
        /* IPVS decrements before its MTU check (__ip_vs_get_out_rt): a
         * frag-needed quotes the packet one hop older. A refused frame is
         * given back as it came. */
        uint32_t ttl_word = pylvs_rd32(ip + 8);
        ip_decrease_ttl(ip);
        uint32_t path_mtu =
            c->xmit == XMIT_TUN
                ? egress_mtu(e, dest->out_port, pylvs_tun_overhead(dest->tun_type),
                             pmtu_get(e, c->daddr, now))
                : egress_mtu(e, dest->out_port, 0, 0);
        /* pmtu_disc 0: a tunnelled packet is never refused for its size
         * (ensure_mtu_is_adequate); the outer packet is fragmented instead. */
        int nodf = c->xmit == XMIT_TUN && e->sysctl[SYS_PMTU_DISC] == 0;
        int mtu = nodf ? MTU_FITS
                       : mtu_check(e, em, frame, eth, ip, ihl, tot, proto, path_mtu, in_port,
                                   daddr, now);
        if (__builtin_expect(mtu >= 0, 0)) {
            pylvs_wr32(ip + 8, ttl_word);
            return finish(e, mtu, PYLVS_V_DROP);
        }
        if (c->xmit == XMIT_TUN)
            return tun_xmit(e, em, c, dest, frame, ip, ihl, tot, proto,
                            mtu == MTU_FRAGMENT ? path_mtu : 0,
                            nodf ? egress_mtu(e, dest->out_port, 0, pmtu_get(e, c->daddr, now))
                                 : 0);
        if (c->xmit == XMIT_NAT)
            *out_port = nat_xmit_in(e, c, dest, frame, eth, ip, l4, l4len, proto, daddr, dport, 0);
        else
            *out_port = dr_xmit(e, dest, frame, eth, ip, l4, l4len, proto);
        if (__builtin_expect(mtu == MTU_FRAGMENT, 0))
            return fragment_out(e, em, eth, ip, tot, *out_port);
    } else {
        if (__builtin_expect(c->flags & CONN_F_NO_L2, 0) && !sync_route_l2(e, c))
            return finish(e, ST_DROP_SYNC_NO_MAC, PYLVS_V_DROP);
        conn_set_state(e, c, DIR_OUTPUT, tcpflags, now);
        count_traffic(e, c, T_OUTPKTS, T_OUTBYTES, tot);
        if (__builtin_expect(ip[8] <= 1, 0))
            return finish(e, ttl_exceeded(e, em, eth, ip, tot, in_port, now,
                                          reply_icmp_saddr(e, c, in_port), 1), PYLVS_V_DROP);
        int mtu = MTU_FITS;
        if (pylvs_port(&e->net, c->in_port) != NULL) {
            mtu = mtu_check(e, em, frame, eth, ip, ihl, tot, proto,
                            egress_mtu(e, c->in_port, 0, 0), in_port,
                            reply_icmp_saddr(e, c, in_port), now);
            if (__builtin_expect(mtu >= 0, 0))
                return finish(e, mtu, PYLVS_V_DROP);
        }
        /* ip_forward: frag-needed above quoted the packet as it came. */
        ip_decrease_ttl(ip);
        *out_port = nat_xmit_out(e, c, frame, eth, ip, l4, l4len, proto, saddr, sport);
        if (__builtin_expect(mtu == MTU_FRAGMENT, 0))
            return fragment_out(e, em, eth, ip, tot, *out_port);
    }
    return finish(e, ST_TX_FRAMES, PYLVS_V_TX);
}

int pylvs_engine_frame(PylvsEngine *e, uint8_t *frame, uint32_t len, uint16_t in_port,
                       double now, uint16_t *out_port, struct pylvs_emit *em)
{
    int v = engine_frame(e, frame, len, in_port, now, out_port, NULL, em);
    if (__builtin_expect(e->ops_slot != NO_SLOT, 0))
        ops_done(e);
    return v;
}


/* Parse up to 8 frames and hash the tuples of those for the conn path, all
 * in one pylvs_siphash13_2w_x8. */
#define PARSE_GROUP 8
static void parse_group(const PylvsEngine *e, uint8_t *const *frames, const uint32_t *lens,
                        int n, struct pkt *pk)
{
    pylvs_u64x8 m0 = {0}, m1 = {0}, h;
    int lane[PARSE_GROUP], k = 0;
    for (int i = 0; i < n; i++) {
        struct pkt *p = &pk[i];
        if (frame_parse(frames[i], lens[i], p) != PARSE_TUPLE)
            continue;
        m0[k] = key_word0(p->saddr, p->daddr);
        m1[k] = key_word1(p->proto, p->sport, p->dport);
        lane[k++] = i;
    }
    if (k == 0)
        return;
    pylvs_siphash13_2w_x8(e->k0, e->k1, &m0, &m1, &h);
    for (int l = 0; l < k; l++)
        pk[lane[l]].hash = h[l];
}

int pylvs_engine_run(PylvsEngine *e, uint8_t *const *frames, const uint32_t *lens,
                     const uint16_t *ports, uint8_t *verdicts, uint16_t *outs, int count,
                     double now, struct pylvs_emit *em, const struct pylvs_emit_room *room)
{
    /* A pipeline over the frames, so that the two random reads of a lookup
     * (index bucket, then conn) overlap with work on other frames: frames
     * i+DB.. get parsed and hashed (PARSE_GROUP at a time) and frame i+DB
     * its bucket prefetched, frame i+D its conn, frame i is processed. In
     * a table larger than the caches (GROUPED_MIN_BUCKETS) the prefetches
     * go out a PARSE_GROUP at a time instead, back to back: there each one
     * also misses the TLB, a prefetch holds up retirement until its page
     * walk is done, and issued together the walks overlap one another
     * instead of each stalling the frame work between them (10 M flows:
     * 0.93x the CPU time of one at a time; at 100 k flows, where the table
     * is in L3, 1.1x, so one at a time there; bench/README.md,
     * "table-scale"). A scheduler upcall runs Python, which may write the frames:
     * those parsed before it are parsed again when their turn comes. */
    enum { D = PREFETCH_DISTANCE, DB = BUCKET_DISTANCE, G = PARSE_GROUP };
    _Static_assert(D % G == 0 && DB % G == 0 && DB > D,
                   "the prefetch distances are whole parse groups");
    const int grouped = e->mask >= GROUPED_MIN_BUCKETS - 1;
    struct pkt pk[PYLVS_ENGINE_RUN_MAX];
    if (count > PYLVS_ENGINE_RUN_MAX)
        count = PYLVS_ENGINE_RUN_MAX;
    int parsed = 0, stale = 0;
    uint64_t upcalls = e->upcalls;
    for (int i = -DB; i < count; i++) {
        int j = i + DB;
        if (j < count) {
            if (j == parsed) { /* j is a multiple of G */
                int n = count - parsed < G ? count - parsed : G;
                parse_group(e, frames + parsed, lens + parsed, n, pk + parsed);
                parsed += n;
                for (int k = j; grouped && k < parsed; k++)
                    if (pk[k].code == PARSE_TUPLE)
                        __builtin_prefetch(&e->index[(uint32_t)pk[k].hash & e->mask]);
            }
            if (!grouped && pk[j].code == PARSE_TUPLE)
                __builtin_prefetch(&e->index[(uint32_t)pk[j].hash & e->mask]);
        }
        j = i + D;
        if (!grouped) {
            if (j >= 0 && j < count)
                prefetch_conn(e, &pk[j]);
        } else if ((i & (G - 1)) == 0) { /* -DB is a multiple of G */
            for (int k = j < 0 ? 0 : j; k < j + G && k < count; k++)
                prefetch_conn(e, &pk[k]);
        }
        if (i < 0)
            continue;
        if (room != NULL && i > 0 &&
            (em->cap - em->used < room->bytes || em->max - em->n < room->frames))
            return i;
        uint16_t op = 0;
        int v = engine_frame(e, frames[i], lens[i], ports[i], now, &op,
                             i < stale ? NULL : &pk[i], em);
        if (__builtin_expect(e->ops_slot != NO_SLOT, 0))
            ops_done(e);
        if (__builtin_expect(e->upcalls != upcalls, 0)) {
            upcalls = e->upcalls;
            stale = parsed;
        }
        verdicts[i] = (uint8_t)v;
        if (v == PYLVS_V_TX)
            outs[i] = op;
        if (room != NULL)
            room->emit_end[i] = em->n;
    }
    return count;
}

long engine_batch(PylvsEngine *e, uint8_t *frames, Py_ssize_t slot, const uint32_t *lens,
                  const uint16_t *ports, uint8_t *verdicts, uint16_t *outs, Py_ssize_t count,
                  double now, struct pylvs_emit *em)
{
    uint8_t *ptr[PYLVS_ENGINE_RUN_MAX];
    uint32_t len[PYLVS_ENGINE_RUN_MAX];
    long tx = 0;
    for (Py_ssize_t c0 = 0; c0 < count; c0 += PYLVS_ENGINE_RUN_MAX) {
        int n = count - c0 < PYLVS_ENGINE_RUN_MAX ? (int)(count - c0) : PYLVS_ENGINE_RUN_MAX;
        for (int i = 0; i < n; i++) {
            ptr[i] = frames + (c0 + i) * slot;
            /* Checked by the caller, but a scheduler upcall of an earlier
             * run may have written it since. */
            len[i] = (Py_ssize_t)lens[c0 + i] > slot ? (uint32_t)slot : lens[c0 + i];
        }
        pylvs_engine_run(e, ptr, len, ports + c0, verdicts + c0, outs + c0, n, now, em, NULL);
        for (int i = 0; i < n; i++)
            tx += verdicts[c0 + i] == PYLVS_V_TX;
    }
    return tx;
}
