# C types for the compiled engine (gkcp._kcp_compiled), which Cython builds
# from kcp.py itself; this file only declares types, kcp.py holds all logic.
# setup.py copies it next to the generated module as _kcp_compiled.pxd.
#
# Every integer is a C long long (i64), never a 32-bit type: kcp.py keeps its
# fields within 32 bits by masking, but its intermediate values (sums of two
# u32 values, negative differences before a mask) need more, and in 64 bits
# they are exactly what Python computes.  setup.py also turns on Cython's
# overflowcheck, so a value that would not fit raises OverflowError instead of
# wrapping, and leaves cdivision off, so // and % round as in Python.
#
# Change this file or kcp.py and the extension must be rebuilt: the digest
# check at the end of kcp.py otherwise selects the pure-Python engine.

cimport cython

ctypedef long long i64

cdef i64 CMD_PUSH, CMD_ACK, CMD_WASK, CMD_WINS, ASK_SEND, ASK_TELL
cdef i64 OVERHEAD, RTO_NDL, RTO_MIN, RTO_DEF, RTO_MAX, WND_SND, WND_RCV, MTU_DEF
cdef i64 INTERVAL, DEADLINK, THRESH_INIT, THRESH_MIN, PROBE_INIT, PROBE_LIMIT
cdef i64 FASTACK_LIMIT, MASK, HALF

cdef i64 _diff(i64 later, i64 earlier)
# _i32 and _cdiv stay Python functions: they only run on rare paths, and
# Cython 3.3 miscompiles abs() of a C integer under overflowcheck.


@cython.final
cdef class _Segment:
    cdef public i64 sn, frg, ts, resendts, rto, fastack, xmit
    cdef public object data


@cython.final
cdef class KCP:
    cdef public i64 conv, snd_una, snd_nxt, rcv_nxt, ts_recent, ts_lastack
    cdef public i64 ts_probe, probe_wait, snd_wnd, rcv_wnd, rmt_wnd, cwnd, incr
    cdef public i64 probe, mtu, mss, stream, state, rx_srtt, rx_rttval, rx_rto
    cdef public i64 rx_minrto, current, interval, ts_flush, nodelay_, updated
    cdef public i64 ssthresh, fastresend, fastlimit, nocwnd, xmit, dead_link
    cdef public object output, snd_queue, snd_buf, rcv_queue
    cdef public dict rcv_buf
    cdef public list acklist

    @cython.locals(length=i64, frg=i64)
    cpdef i64 peeksize(self)

    @cython.locals(frg=i64, recover=bint)
    cpdef recv(self)

    @cython.locals(size=Py_ssize_t, offset=Py_ssize_t, prev_una=i64, have_ack=bint,
                   maxack=i64, latest_ts=i64, conv=i64, sconv=i64, cmd=i64, frg=i64,
                   wnd=i64, ts=i64, sn=i64, una=i64, length=i64, rtt=i64)
    cpdef i64 input(self, datagram)

    @cython.locals(mss=i64)
    cpdef _grow_cwnd(self)

    cpdef _update_ack(self, i64 rtt)  # untyped locals: the abs() bug above

    cpdef _shrink_buf(self)

    @cython.locals(d=i64, changed=bint)
    cpdef _parse_una(self, i64 una)

    cpdef _parse_ack(self, i64 sn)

    @cython.locals(una=i64, limit=i64, seg=_Segment)
    cpdef _parse_fastack(self, i64 sn, i64 ts)

    @cython.locals(rcv_buf=dict)
    cpdef _parse_data(self, i64 sn, i64 frg, data)

    @cython.locals(rcv_buf=dict, rcv_wnd=i64)
    cpdef _move_rcv_buf(self)

    @cython.locals(slap=i64)
    cpdef update(self, i64 current)

    @cython.locals(ts_flush=i64, slap=i64, minimal=i64, diff=i64, seg=_Segment)
    cpdef i64 check(self, i64 current)

    @cython.locals(current=i64, mtu=i64, conv=i64, rcv_nxt=i64, wnd=i64, size=i64,
                   acklist=list, sn=i64, ts=i64, i=Py_ssize_t, flag=i64, cmd=i64,
                   cwnd=i64, limit=i64, snd_nxt=i64, rx_rto=i64, resent=i64, rtomin=i64,
                   change=i64, lost=bint, nodelay=i64, fastlimit=i64, dead_link=i64,
                   seg=_Segment, need=i64, step=i64, inflight=i64)
    cpdef flush(self)
